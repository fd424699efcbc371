"""The shop's client of its payment gateway (``client.py``). The fake gateway it talks to in
the demo, the lab and the tests is not the shop's: it lives in ``deploy/gateway/``."""
