from django.contrib import admin
from django.urls import include, path

from shop.views import api, pages

urlpatterns = [
    path("", pages.catalog, name="catalog"),
    path("cart/", pages.cart, name="cart"),
    path("cart/update/", pages.cart_update, name="cart-update"),
    path("checkout/", pages.checkout, name="checkout"),
    path("orders/<uuid:reference>/", pages.order_detail, name="order-detail"),
    path("api/products/", api.products, name="api-products"),
    path("api/orders/", api.orders, name="api-orders"),
    path("api/orders/<uuid:reference>/", api.order_detail, name="api-order-detail"),
    path("api/reports/sales/", api.sales_report, name="api-sales-report"),
    path("", include("jobs.urls")),  # before admin/: the Operations page is under it
    path("admin/", admin.site.urls),
]
