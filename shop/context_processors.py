from django.http import HttpRequest

from shop.cart import cart_items


def cart(request: HttpRequest) -> dict[str, int]:
    return {"cart_count": sum(cart_items(request).values())}
