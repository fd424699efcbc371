"""A second Django project that installs `jobs` and nothing of the shop: the proof that
the reliability layer lifts (tests/test_lift.py runs it on real worker processes).

Everything `jobs` needs beyond Django's own settings: the app in INSTALLED_APPS, its
URLs, a broker, and the queues. The rest are jobs' defaults (jobs/conf.py).
"""

import os

import dj_database_url
from kombu import Queue

SECRET_KEY = "lift-test-only"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "127.0.0.1", "localhost"]
USE_TZ = True
INSTALLED_APPS = [
    "jobs",  # before the admin: its admin/index.html links the Operations page
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "tests.liftproject",
]
MIDDLEWARE = [
    "jobs.middleware.ProbeMiddleware",  # probes by pod IP, before host validation
    "jobs.middleware.CorrelationIdMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.liftproject.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "static/"
DATABASES = {"default": dj_database_url.parse(os.environ["LIFT_DATABASE_URL"])}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

CELERY_BROKER_URL = os.environ["CELERY_BROKER_URL"]
CELERY_TASK_QUEUES = [Queue("lift")]
CELERY_TASK_DEFAULT_QUEUE = "lift"
# One option of the host's own: jobs adds the others (socket timeouts, health checks).
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 7200}

# Quick retries, so the test sees a job retried and dead-lettered in seconds.
JOBS_RETRY_MAX_RETRIES = 2
JOBS_RETRY_BACKOFF_BASE = 0.2
JOBS_RETRY_BACKOFF_CAP = 0.5
JOBS_RETRY_OUTAGE_BUDGET = 0
