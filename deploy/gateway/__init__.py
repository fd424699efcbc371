"""The fake payment gateway: a stand-in card processor for the demo, the lab, the bench and
the tests (``python -m deploy.gateway``). Not part of the shop: standard library only, it
imports nothing of the project (import-linter) and ships in its own image
(``docker build --target gateway``), never in the shop's."""
