"""Checkout's rows in one hand-written SQL transaction (psycopg, no Django): the bound
scenario 9 measures the shop's checkout against, through gunicorn
(`POST /bench/orders-sql/`, deploy/bench/web.py) and straight from the bench's threads.
"""

import json
import uuid
from decimal import Decimal
from typing import Any

CHARGE_TASK = "shop.tasks.payments.charge_payment"


def sql_checkout(conn: Any, data: dict[str, Any], key: str | None) -> str:
    """Write what checkout writes (order, lines, payment, outbox row, stock) in one
    transaction; the outbox row is written already sent, so no relay publishes it."""
    quantities = {item["sku"]: int(item["quantity"]) for item in data["items"]}
    reference = uuid.uuid4()
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            "SELECT id, sku, price FROM shop_product WHERE sku = ANY(%s) ORDER BY id",
            [list(quantities)],
        )
        products = cur.fetchall()
        total = sum((price * quantities[sku] for _, sku, price in products), Decimal("0"))
        cur.execute(
            "INSERT INTO shop_order (reference, idempotency_key, email, status, total,"
            " created_at, updated_at) VALUES (%s, %s, %s, 'pending', %s, now(), now())"
            " RETURNING id",
            [reference, key, data["email"], total],
        )
        (order_id,) = cur.fetchone()
        cur.executemany(
            "INSERT INTO shop_orderline (order_id, product_id, quantity, unit_price)"
            " VALUES (%s, %s, %s, %s)",
            [(order_id, pk, quantities[sku], price) for pk, sku, price in products],
        )
        cur.execute(
            "INSERT INTO shop_payment (order_id, idempotency_key, amount, card_token, status,"
            " gateway_charge_id, failure_message, updated_at)"
            " VALUES (%s, %s, %s, %s, 'pending', '', '', now()) RETURNING id",
            [order_id, uuid.uuid4(), total, data["card_token"]],
        )
        (payment_id,) = cur.fetchone()
        cur.execute(
            "INSERT INTO jobs_outboxmessage (task_id, task_name, args, kwargs, headers,"
            " created_at, sent_at, attempts, failures, last_error)"
            " VALUES (%s, %s, %s, '{}', '{}', now(), now(), 1, 0, '')",
            [uuid.uuid4(), CHARGE_TASK, json.dumps([payment_id])],
        )
        cur.executemany(
            "UPDATE shop_product SET stock = stock - %s WHERE id = %s AND stock >= %s",
            [(quantities[sku], pk, quantities[sku]) for pk, sku, _ in products],
        )
    return str(reference)
