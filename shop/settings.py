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

from jobs.conf import CELERY_DEFAULTS as _celery_defaults
from jobs.conf import DEFAULTS as _jobs

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

# Unset: the gateway `make run` starts, on GATEWAY_PORT when that is set.
_local_gateway = f"http://127.0.0.1:{env('GATEWAY_PORT', '8100')}"
PAYMENT_GATEWAY_URL = env("PAYMENT_GATEWAY_URL", _local_gateway)
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
REPORT_RETENTION_DAYS = env_int("REPORT_RETENTION_DAYS", 30)  # older reports and runs go
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

# --- Celery and jobs ------------------------------------------------------------
# The settings the guarantees rest on (late acks, prefetch 1, time limits, JSON only,
# ...) come with jobs (jobs/conf.py, each with its reason); below is only what is the
# shop's to say, and what the environment may change. Every process (web, workers, beat,
# Flower) loads this one module: on Redis the shortest visibility timeout among clients
# wins (jobs/NOTES.md [§2]).

CELERY_BROKER_URL = env("CELERY_BROKER_URL", "redis://localhost:6379/0")
# What the environment may change; jobs adds the rest of its options (health checks,
# keepalive) to these.
_transport = _celery_defaults["broker_transport_options"]
CELERY_BROKER_TRANSPORT_OPTIONS = {
    # Every retry delay and hard time limit must stay well below it (checked at start-up).
    "visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", _transport["visibility_timeout"]),
    "socket_timeout": env_float("CELERY_BROKER_SOCKET_TIMEOUT", _transport["socket_timeout"]),
    "socket_connect_timeout": env_float(
        "CELERY_BROKER_CONNECT_TIMEOUT", _transport["socket_connect_timeout"]
    ),
    "unacked_restore_interval": env_float(
        "CELERY_UNACKED_RESTORE_INTERVAL", _transport["unacked_restore_interval"]
    ),
}
CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT = env_float("CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT", 30.0)

# Only for tasks that ask (ignore_result=False: the sales report); rows are the truth [§4]
CELERY_RESULT_BACKEND = "django-db"
CELERY_RESULT_EXTENDED = True  # store task name, args, worker, queue with each result [§4]
CELERY_RESULT_EXPIRES = 7 * 24 * 3600  # purged daily by beat's celery.backend_cleanup [§4]

# The shop's queues, declared once; everything else (routes, canaries, the worker pools
# of compose and Kubernetes, the metrics) derives from this list [§7].
CELERY_TASK_QUEUES = [Queue(name) for name in ("payments", "emails", "reports", "default")]
CELERY_TASK_DEFAULT_QUEUE = "default"
# Routes are declared once, by task name (the routing task attributes are deprecated in
# Celery 5.7) [§7]. Anything unrouted (the outbox relay, celery.*) goes to `default`.
CELERY_TASK_ROUTES = {
    "shop.tasks.payments.*": {"queue": "payments"},
    "shop.tasks.emails.*": {"queue": "emails"},
    "shop.tasks.reports.*": {"queue": "reports"},
}

CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
# The shop's own periodic work; jobs adds its own entries (the relay, pruning, the
# reconciler, a canary per queue: jobs.celery.beat_entries).
CELERY_BEAT_SCHEDULE = {
    "build-sales-report": {
        "task": "shop.tasks.reports.build_sales_report",
        "schedule": env_float("SALES_REPORT_INTERVAL", 3600.0),
    },
}

# jobs' own settings (jobs/conf.py says what each does, and why its default): the
# environment may change them, by the name without JOBS_.
JOBS_OUTBOX_RELAY_GRACE = env_float("OUTBOX_RELAY_GRACE", _jobs.OUTBOX_RELAY_GRACE)
JOBS_OUTBOX_RELAY_INTERVAL = env_float("OUTBOX_RELAY_INTERVAL", _jobs.OUTBOX_RELAY_INTERVAL)
JOBS_OUTBOX_BATCH_SIZE = env_int("OUTBOX_BATCH_SIZE", _jobs.OUTBOX_BATCH_SIZE)
JOBS_OUTBOX_PUBLISH_TIMEOUT = env_float("OUTBOX_PUBLISH_TIMEOUT", _jobs.OUTBOX_PUBLISH_TIMEOUT)
JOBS_OUTBOX_PUBLISH_PAUSE = env_float("OUTBOX_PUBLISH_PAUSE", _jobs.OUTBOX_PUBLISH_PAUSE)
JOBS_OUTBOX_RETENTION_DAYS = env_int("OUTBOX_RETENTION_DAYS", _jobs.OUTBOX_RETENTION_DAYS)
JOBS_OUTBOX_RELAY_TIME_BUDGET = env_float(
    "OUTBOX_RELAY_TIME_BUDGET", _jobs.OUTBOX_RELAY_TIME_BUDGET
)
JOBS_OUTBOX_MAX_FAILURES = env_int("OUTBOX_MAX_FAILURES", _jobs.OUTBOX_MAX_FAILURES)
JOBS_RETRY_MAX_RETRIES = env_int("RETRY_MAX_RETRIES", _jobs.RETRY_MAX_RETRIES)
JOBS_RETRY_BACKOFF_BASE = env_float("RETRY_BACKOFF_BASE", _jobs.RETRY_BACKOFF_BASE)
JOBS_RETRY_BACKOFF_CAP = env_float("RETRY_BACKOFF_CAP", _jobs.RETRY_BACKOFF_CAP)
JOBS_RETRY_OUTAGE_BUDGET = env_float("RETRY_OUTAGE_BUDGET", _jobs.RETRY_OUTAGE_BUDGET)
JOBS_DEAD_LETTER_RETENTION_DAYS = env_int(
    "DEAD_LETTER_RETENTION_DAYS", _jobs.DEAD_LETTER_RETENTION_DAYS
)
JOBS_POISON_MAX_DELIVERIES = env_int("POISON_MAX_DELIVERIES", _jobs.POISON_MAX_DELIVERIES)
JOBS_RECONCILE_INTERVAL = env_float("RECONCILE_INTERVAL", _jobs.RECONCILE_INTERVAL)
JOBS_CANARY_INTERVAL = env_float("CANARY_INTERVAL", _jobs.CANARY_INTERVAL)
JOBS_WORKER_METRICS_PORT = env_int("WORKER_METRICS_PORT", _jobs.WORKER_METRICS_PORT)


# The services the workers call (jobs/dependencies.py): a rate limit each, in calls per
# second for every worker together (0: none), and a circuit breaker each. Processors
# publish their limit (Stripe's is 100 requests a second in live mode); stay a little
# below it: calls start evenly spaced, and the network shifts them by milliseconds.
_BREAKER = {
    "failures": env_int("BREAKER_FAILURES", 5),  # in a row: the breaker opens
    "cooldown": env_float("BREAKER_COOLDOWN", 30.0),  # open this long, then one probe
    "ramp": env_float("BREAKER_RAMP", 30.0),  # after closing, the rate climbs this long
}
JOBS_DEPENDENCIES = {
    "gateway": {"rate": env_float("PAYMENT_GATEWAY_RATE_LIMIT", 50.0) or None, **_BREAKER},
    "mail": {"rate": env_float("MAIL_RATE_LIMIT", 20.0) or None, **_BREAKER},
}
JOBS_DEPENDENCY_MAX_WAIT = env_float("DEPENDENCY_MAX_WAIT", _jobs.DEPENDENCY_MAX_WAIT)

# --- Processes started by `make run` (deploy/run_local.py) ------------------------

WEB_PORT = env_int("WEB_PORT", 8000)
GATEWAY_PORT = env_int("GATEWAY_PORT", urlsplit(PAYMENT_GATEWAY_URL).port or 8100)
FLOWER_PORT = env_int("FLOWER_PORT", 5555)
JOBS_FLOWER_URL = env("FLOWER_URL", f"http://127.0.0.1:{FLOWER_PORT}/")  # linked from Operations
JOBS_PROMETHEUS_URL = env("PROMETHEUS_URL", "")  # linked from Operations when set
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
