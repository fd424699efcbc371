"""The shop: Django project and shop domain."""
