"""The fake payment gateway: a standalone card-processor service (``python -m shop.gateway``)
and the shop's client for it. The service (``server.py``) uses the standard library only."""
