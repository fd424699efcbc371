"""Settings for the shop, every environment variable read here and nowhere else.

Local defaults are safe and need nothing but Redis: SQLite file, file-based email,
debug off. `SHOP_ENV=production` refuses to start without the secrets it needs.
Every variable is listed, with its default, in `.env.example`.
"""

import os
from pathlib import Path
from urllib.parse import urlsplit

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from kombu import Queue

BASE_DIR = Path(__file__).resolve().parent.parent


def _load_env_file(path: Path) -> None:
    """Read KEY=VALUE lines from `.env` without overriding the real environment."""
    if not path.is_file():
        return
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.split(" #", 1)[0].strip().strip("'\"")  # drop a trailing comment
        os.environ.setdefault(key.strip(), value)


_load_env_file(BASE_DIR / ".env")


def env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


SHOP_ENV = env("SHOP_ENV", "local")  # local | production
PRODUCTION = SHOP_ENV == "production"

# --- Django -------------------------------------------------------------------

SECRET_KEY = env("SECRET_KEY", "" if PRODUCTION else "local-dev-only-insecure-key")
if not SECRET_KEY:
    raise ImproperlyConfigured("SECRET_KEY must be set when SHOP_ENV=production.")
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = [h for h in env("ALLOWED_HOSTS", "" if PRODUCTION else "*").split(",") if h]
if PRODUCTION and not ALLOWED_HOSTS:
    raise ImproperlyConfigured("ALLOWED_HOSTS must be set when SHOP_ENV=production.")
CSRF_TRUSTED_ORIGINS = [o for o in env("CSRF_TRUSTED_ORIGINS", "").split(",") if o]

VAR_DIR = Path(env("SHOP_VAR_DIR", str(BASE_DIR / "var")))

INSTALLED_APPS = [
    "jobs",  # first: its admin/index.html adds the Operations link to the admin's own
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_results",
    "shop",
]

MIDDLEWARE = [
    "jobs.middleware.CorrelationIdMiddleware",
    "jobs.middleware.ProbeMiddleware",  # probes and scrapes by pod IP: before host checks
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "shop.urls"
WSGI_APPLICATION = "shop.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "shop.context_processors.cart",
            ],
        },
    },
]

DATABASE_URL = env("DATABASE_URL", "")
if DATABASE_URL:
    # Persistent connections, checked before reuse: a new PostgreSQL connection costs
    # ~3.2 ms, forty times an insert (jobs/NOTES.md §4). Workers keep them across
    # tasks too (CELERY_DB_REUSE_MAX below, jobs/connections.py).
    DATABASES = {
        "default": dj_database_url.parse(
            DATABASE_URL, conn_max_age=env_int("CONN_MAX_AGE", 60), conn_health_checks=True
        )
    }
else:
    # The embedded default for `make run`: one SQLite file shared by web, workers and
    # beat. WAL lets readers run beside the one writer; IMMEDIATE transactions take the
    # write lock up front so two writers wait (timeout) instead of failing mid-transaction.
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": env("SQLITE_PATH", str(VAR_DIR / "shop.sqlite3")),
            "OPTIONS": {
                "timeout": 20,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
# Serve app static files straight from the apps in every mode (no collectstatic needed
# for `make run`); production images run collectstatic and get compressed files.
WHITENOISE_USE_FINDERS = True

# A JSON API body is small: 64 KiB is far above any real order and far below a memory risk.
DATA_UPLOAD_MAX_MEMORY_SIZE = 64 * 1024

SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = PRODUCTION
CSRF_COOKIE_SECURE = PRODUCTION
if PRODUCTION:  # behind a TLS-terminating proxy; `manage.py check --deploy` passes
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    # Probes and the Prometheus scrape come over plain HTTP from inside the cluster.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31_536_000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True

# --- Email ----------------------------------------------------------------------

EMAIL_BACKEND = env("EMAIL_BACKEND", "django.core.mail.backends.filebased.EmailBackend")
EMAIL_FILE_PATH = env("EMAIL_FILE_PATH", str(VAR_DIR / "mail"))
EMAIL_HOST = env("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 1025)
EMAIL_HOST_USER = env("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_TIMEOUT = env_int("EMAIL_TIMEOUT", 10)  # a hung SMTP server must not hold a worker
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", "shop@example.com")

# --- The shop -------------------------------------------------------------------

PAYMENT_GATEWAY_URL = env("PAYMENT_GATEWAY_URL", "http://127.0.0.1:8100")
# Where shoppers' browsers reach the gateway to turn a card number into a token (its
# POST /v1/tokens, like a processor's browser SDK): the card goes from the browser to the
# processor, and the shop only ever sees the token.
PAYMENT_GATEWAY_PUBLIC_URL = env("PAYMENT_GATEWAY_PUBLIC_URL", PAYMENT_GATEWAY_URL)
# (connect, read) seconds; the read timeout stays below charge_payment's soft time limit.
PAYMENT_GATEWAY_TIMEOUT = (
    env_float("PAYMENT_GATEWAY_CONNECT_TIMEOUT", 5.0),
    env_float("PAYMENT_GATEWAY_READ_TIMEOUT", 15.0),
)
SHOP_CURRENCY = "EUR"
REPORTS_DIR = Path(env("REPORTS_DIR", str(VAR_DIR / "reports")))
# Seconds the sales report sleeps per chunk of orders: makes the bulk job visibly slow.
REPORT_CHUNK_DELAY = env_float("REPORT_CHUNK_DELAY", 0.5)
# The reconciler (shop/reconcile.py) looks at orders and payments older than this only:
# younger ones may simply still be in flight, their task retrying. Longer than the whole
# retry budget (28.5 minutes at most with the defaults; system check shop.E001).
RECONCILE_AFTER_MINUTES = env_int("RECONCILE_AFTER_MINUTES", 45)
# Seconds an order may stay unpaid (its charge retrying, or its dead letter waiting for
# an operator) before the reconciler cancels it, after asking the gateway: a charge that
# happened makes it paid instead. Card processors forget idempotency keys after about a
# day, and stock reserved by an order nobody pays is stock nobody else can buy.
ORDER_PAYMENT_DEADLINE = env_float("ORDER_PAYMENT_DEADLINE", 24 * 3600.0)

# --- Celery ---------------------------------------------------------------------
# Each setting below rests on a Celery, kombu or Redis behaviour written down in
# jobs/NOTES.md (the section in brackets), with the version and where to check it upstream.
# Every process (web, workers, beat, Flower) loads this one module: on Redis the shortest
# visibility timeout among clients wins [§2].

CELERY_BROKER_URL = env("CELERY_BROKER_URL", "redis://localhost:6379/0")
# A message delivered but not acked for this long is handed to another worker. Every
# retry delay and hard time limit must stay well below it (checked at start-up) [§2].
CELERY_VISIBILITY_TIMEOUT = env_int("CELERY_VISIBILITY_TIMEOUT", 3600)
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": CELERY_VISIBILITY_TIMEOUT,
    # kombu's socket_timeout defaults to None: a publish on a dead connection would hang
    # forever and health checks would never run [§2].
    "socket_timeout": env_float("CELERY_BROKER_SOCKET_TIMEOUT", 15.0),
    "socket_connect_timeout": env_float("CELERY_BROKER_CONNECT_TIMEOUT", 5.0),
    "socket_keepalive": True,
    "retry_on_timeout": True,
    "health_check_interval": 25,  # also checks the BRPOP connection since kombu 5.7 [§2]
    # How often unacked messages older than the visibility timeout are restored (the sweep
    # is throttled by interval x throttle; 1 makes every interval count) [§2].
    "unacked_restore_interval": env_float("CELERY_UNACKED_RESTORE_INTERVAL", 30.0),
    "unacked_restore_throttle": 1,
}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True  # workers wait for Redis instead of exiting
CELERY_BROKER_CONNECTION_MAX_RETRIES = None  # ...for as long as it takes
CELERY_BROKER_CHANNEL_ERROR_RETRY = True  # a replica demoted to read-only is retried [§2]

CELERY_RESULT_BACKEND = "django-db"  # results are observability only; rows are the truth [§4]
CELERY_RESULT_EXTENDED = True  # store task name, args, worker, queue with each result [§4]
CELERY_RESULT_EXPIRES = 7 * 24 * 3600  # purged daily by beat's celery.backend_cleanup [§4]

CELERY_TASK_SERIALIZER = "json"  # JSON only: no pickle from the network
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]

CELERY_TASK_ACKS_LATE = True  # ack after the task ran: a crash mid-task redelivers it [§1]
CELERY_WORKER_PREFETCH_MULTIPLIER = 1  # with late acks, each child reserves exactly one [§1]
CELERY_TASK_REJECT_ON_WORKER_LOST = False  # never an unbounded requeue loop [§1]
# A killed pool child re-sends the task like retry(): bounded by max_retries, then a
# FAILURE that the dead-letter receiver sees [§1].
CELERY_TASK_RETRY_ON_WORKER_LOST = True
CELERY_TASK_ACKS_ON_FAILURE = True  # False on Redis silently deletes the message [§1]
CELERY_TASK_ACKS_ON_TIMEOUT = True  # False requeues a timed-out task in a loop [§1]
# Without it, late-ack tasks running when the broker connection drops run twice, in parallel.
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
# Skip a redelivered task whose SUCCESS is already stored; DB constraints stay the real guard.
CELERY_WORKER_DEDUPLICATE_SUCCESSFUL_TASKS = True
CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT = env_float("CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT", 30.0)
# Soft shutdown even when idle, so reserved ETA tasks are restored, not lost [§1].
CELERY_WORKER_ENABLE_SOFT_SHUTDOWN_ON_IDLE = True
CELERY_WORKER_ETA_TASK_LIMIT = 1000  # ETA/countdown tasks sit in worker RAM: cap them [§1]
# Celery's Django fixup closes every database connection around every task, whatever
# CONN_MAX_AGE says; with this it does so once per this many tasks, and jobs/connections.py
# applies Django's own rule (CONN_MAX_AGE, health checks) around each task instead.
CELERY_DB_REUSE_MAX = 1000
CELERY_WORKER_MAX_TASKS_PER_CHILD = 1000  # recycle children: slow leaks cannot pile up [§6]
CELERY_WORKER_MAX_MEMORY_PER_CHILD = 300_000  # KiB; a bloated child is replaced [§6]

# Defaults for every task; slow or strict tasks set their own [§6].
CELERY_TASK_SOFT_TIME_LIMIT = 50
CELERY_TASK_TIME_LIMIT = 60

# Queues are declared once, here; a route to anything else raises QueueNotFound instead
# of silently creating a queue that no worker consumes [§7].
CELERY_TASK_QUEUES = [Queue(name) for name in ("payments", "emails", "reports", "default")]
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_CREATE_MISSING_QUEUES = False
# Routes are declared once, by task name (the routing task attributes are deprecated in
# Celery 5.7) [§7]. Anything unrouted (the outbox relay, celery.*) goes to `default`.
CELERY_TASK_ROUTES = {
    "shop.tasks.payments.*": {"queue": "payments"},
    "shop.tasks.emails.*": {"queue": "emails"},
    "shop.tasks.reports.*": {"queue": "reports"},
}

CELERY_WORKER_SEND_TASK_EVENTS = True  # Flower sees tasks without `-E` on every worker [§8]
CELERY_TASK_SEND_SENT_EVENT = True  # ...including the SENT state [§8]
# No STARTED row in the result backend: it cost every task one more database write (a
# fifth of a charge's worker time, py-spy in make bench). Flower shows STARTED from the
# task-started event, and the worker logs a `started` line.
CELERY_TASK_TRACK_STARTED = False

CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE = {
    "relay-outbox": {
        "task": "jobs.tasks.relay_outbox",
        "schedule": env_float("OUTBOX_RELAY_INTERVAL", 10.0),
    },
    "prune-outbox": {"task": "jobs.tasks.prune_outbox", "schedule": 3600.0},
    "prune-dead-letters": {"task": "jobs.tasks.prune_dead_letters", "schedule": 86400.0},
    "reconcile": {
        "task": "jobs.tasks.reconcile",
        "schedule": env_float("RECONCILE_INTERVAL", 300.0),
    },
    # A canary to every queue (jobs/canary.py); beat sends them itself, not through a
    # task on `default`, so a dead `default` worker cannot silence the other canaries.
    **{
        f"canary-{queue.name}": {
            "task": "jobs.tasks.canary",
            "schedule": env_float("CANARY_INTERVAL", 30.0),
            "args": [queue.name],
            "options": {"queue": queue.name, "expires": 60.0, "ignore_result": True},
        }
        for queue in CELERY_TASK_QUEUES
    },
    "build-sales-report": {
        "task": "shop.tasks.reports.build_sales_report",
        "schedule": env_float("SALES_REPORT_INTERVAL", 3600.0),
    },
}

# --- The outbox (jobs/outbox.py) ------------------------------------------------

# Rows younger than this are left to the publisher registered by their own transaction.
JOBS_OUTBOX_RELAY_GRACE = env_float("OUTBOX_RELAY_GRACE", 10.0)
JOBS_OUTBOX_BATCH_SIZE = env_int("OUTBOX_BATCH_SIZE", 500)
# The after-commit publish (in the request) gives up on a broker that has not answered
# in this many seconds, and the process then leaves publishing to the relay for
# OUTBOX_PUBLISH_PAUSE seconds: a frozen Redis costs one checkout per web process about
# three times the timeout (the publish, then the reconnect's PINGs), the next ones nothing.
JOBS_OUTBOX_PUBLISH_TIMEOUT = env_float("OUTBOX_PUBLISH_TIMEOUT", 1.0)
JOBS_OUTBOX_PUBLISH_PAUSE = env_float("OUTBOX_PUBLISH_PAUSE", 10.0)
JOBS_OUTBOX_RETENTION_DAYS = env_int("OUTBOX_RETENTION_DAYS", 7)
# A relay run stops after this many seconds (the next run goes on), well inside its
# task's 50 s soft time limit: a slow broker never gets the run killed mid-row.
JOBS_OUTBOX_RELAY_TIME_BUDGET = env_float("OUTBOX_RELAY_TIME_BUDGET", 30.0)
# A row that fails to publish for a reason of its own (not the broker down) backs off
# (grace, 2 x grace, ... capped at 10 minutes) and after this many failures becomes a
# dead letter, reason `unpublishable` (about 20 minutes with the defaults).
JOBS_OUTBOX_MAX_FAILURES = env_int("OUTBOX_MAX_FAILURES", 8)

# --- Retries and dead letters (jobs/retry.py, jobs/dead_letters.py) ------------------

# Exponential backoff with equal jitter: retry n waits uniform(c/2, c) s, where
# c = min(cap, base * 2**n) (jobs/retry.py says why not Celery's full jitter). The
# budget of the defaults: ceilings 2, 4, ... 256, then 300 s four times, 1,710 s in all,
# so a job retries for at least 14.25 and at most 28.5 minutes before it is dead-lettered:
# a payment processor's or mail server's incident of 10 minutes dead-letters nothing.
# Each wait stays below half the visibility timeout (a system check enforces it, and
# that the budget rides out RETRY_OUTAGE_BUDGET).
JOBS_RETRY_MAX_RETRIES = env_int("RETRY_MAX_RETRIES", 12)
JOBS_RETRY_BACKOFF_BASE = env_float("RETRY_BACKOFF_BASE", 2.0)
JOBS_RETRY_BACKOFF_CAP = env_float("RETRY_BACKOFF_CAP", 300.0)
# The outage (seconds) the retry budget must be sure to ride out: a shorter guaranteed
# budget is a start-up warning (jobs.W001). 0 turns the warning off (the tests' quick
# retries).
JOBS_RETRY_OUTAGE_BUDGET = env_float("RETRY_OUTAGE_BUDGET", 600.0)
# Replayed and discarded dead letters are pruned after this; `dead` ones never are.
JOBS_DEAD_LETTER_RETENTION_DAYS = env_int("DEAD_LETTER_RETENTION_DAYS", 30)
# A message delivered more often than this without finishing is dead-lettered as poison.
JOBS_POISON_MAX_DELIVERIES = env_int("POISON_MAX_DELIVERIES", 5)
# A bulk replay publishes this many rows per transaction, pausing between batches.
JOBS_REPLAY_BATCH_SIZE = 100
JOBS_REPLAY_BATCH_PAUSE = 0.2

# --- Metrics (jobs/metrics.py) -------------------------------------------------------
# PROMETHEUS_MULTIPROC_DIR (read by prometheus-client itself): a folder shared by the
# processes of one host, so /metrics sums the counts of every worker child.
# A worker on a host of its own serves its share on this port (0: off).
JOBS_WORKER_METRICS_PORT = env_int("WORKER_METRICS_PORT", 0)

# --- Processes started by `make run` (deploy/run_local.py) ------------------------

WEB_PORT = env_int("WEB_PORT", 8000)
GATEWAY_PORT = env_int("GATEWAY_PORT", urlsplit(PAYMENT_GATEWAY_URL).port or 8100)
FLOWER_PORT = env_int("FLOWER_PORT", 5555)
FLOWER_URL = env("FLOWER_URL", f"http://127.0.0.1:{FLOWER_PORT}/")  # linked from Operations
# Flower reads FLOWER_* itself; these are the ones `make run` and compose pass on.
FLOWER_BASIC_AUTH = env("FLOWER_BASIC_AUTH", "")  # user:password[,user2:password2]
# Fixed, so sessions survive restarts and replicas agree (Flower's default is random).
FLOWER_COOKIE_SECRET = env("FLOWER_COOKIE_SECRET", "" if PRODUCTION else "local-flower-cookie")
# Read-only unless the operator opts out: replays belong in the admin, with an audit trail.
FLOWER_READ_ONLY = env_bool("FLOWER_READ_ONLY", True)

# Human-readable lines by default; LOG_FORMAT=json gives one JSON object per line with the
# correlation id and the job fields (jobs/logs.py). Workers use the same configuration.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"correlation": {"()": "jobs.logs.CorrelationFilter"}},
    "formatters": {
        "console": {
            "format": "%(asctime)s %(levelname)s %(name)s [%(correlation_id)s] %(message)s"
        },
        "json": {"()": "jobs.logs.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": env("LOG_FORMAT", "console"),
            "filters": ["correlation"],
        }
    },
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}, "httpx": {"level": "WARNING"}},
}
# Workers log through the LOGGING above instead of Celery replacing the root logger.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
