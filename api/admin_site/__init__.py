"""The operator's web page, ``/admin`` (see :mod:`.pages`)."""

from outbox.api.admin_site.pages import router

__all__ = ["router"]
