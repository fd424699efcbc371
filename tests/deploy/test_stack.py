"""The lab's and the bench's own process is configured as the stack's processes are."""

import shutil

from deploy.stack import Stack


def test_the_labs_own_process_shares_the_workers_limits_not_their_metrics_folder():
    stack = Stack(
        prefix="test-stack-",
        database_url="postgres://postgres@127.0.0.1:5432/unused",
        env={"PAYMENT_GATEWAY_RATE_LIMIT": "38", "BREAKER_COOLDOWN": "5"},
    )
    try:
        env = stack.client_env()
    finally:
        shutil.rmtree(stack.dir)

    # Its gateway calls (an operator's discard) count against the workers' limit.
    assert env["PAYMENT_GATEWAY_RATE_LIMIT"] == "38"
    assert env["BREAKER_COOLDOWN"] == "5"
    assert env["CELERY_BROKER_URL"] == f"redis://127.0.0.1:{stack.redis_port}/0"
    # Its metrics stay out of the stack's /metrics.
    assert "PROMETHEUS_MULTIPROC_DIR" not in env
