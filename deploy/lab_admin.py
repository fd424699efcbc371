"""The lab's operator at the Django admin, over HTTP like a person with a browser: log in,
open a product's change form, save it as it was loaded (a stale form). Standard library
and httpx only."""

from html.parser import HTMLParser
from types import TracebackType

import httpx


class _FormFields(HTMLParser):
    """The fields a browser would post back: inputs, textareas and selected options."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}
        self._textarea: str | None = None
        self._select: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {k: v or "" for k, v in attrs}
        name = attr.get("name")
        if tag == "input" and name and attr.get("type") not in ("submit", "checkbox", "button"):
            self.fields[name] = attr.get("value", "")
        elif tag == "textarea" and name:
            self._textarea, self.fields[name] = name, ""
        elif tag == "select" and name:
            self._select = name
        elif tag == "option" and self._select and "selected" in attr:
            self.fields[self._select] = attr.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "textarea":
            self._textarea = None
        elif tag == "select":
            self._select = None

    def handle_data(self, data: str) -> None:
        if self._textarea:
            self.fields[self._textarea] += data.removeprefix("\n")


def form_fields(page: str) -> dict[str, str]:
    parser = _FormFields()
    parser.feed(page)
    return parser.fields


class AdminSession:
    """A logged-in admin session on the running site."""

    def __init__(self, base_url: str, username: str, password: str) -> None:
        self.client = httpx.Client(base_url=base_url, timeout=30)
        login = self.client.get("/admin/login/")
        token = form_fields(login.text)["csrfmiddlewaretoken"]
        answer = self.client.post(
            "/admin/login/",
            data={
                "username": username,
                "password": password,
                "csrfmiddlewaretoken": token,
                "next": "/admin/",
            },
        )
        if answer.status_code != 302:
            raise RuntimeError(f"admin login failed: HTTP {answer.status_code}")

    def __enter__(self) -> "AdminSession":
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.client.close()

    def product_form(self, product_id: int) -> dict[str, str]:
        """The change form's fields, as loaded now."""
        page = self.client.get(f"/admin/shop/product/{product_id}/change/")
        page.raise_for_status()
        return form_fields(page.text)

    def product_save(self, product_id: int, fields: dict[str, str]) -> None:
        """Post the form back (the "Save" button); raise unless the admin accepted it."""
        answer = self.client.post(
            f"/admin/shop/product/{product_id}/change/", data={**fields, "_save": "Save"}
        )
        if answer.status_code != 302:
            raise RuntimeError(f"the admin refused the product form: HTTP {answer.status_code}")
