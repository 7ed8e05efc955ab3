"""The upload routes read a multipart/form-data body. Any other body (JSON, raw bytes, none at all) would fail
field by field with "body.file: Field required", which says nothing of what to send, so it is refused at once
with the curl form that works. The JSON routes (PATCH /v1/images/{id}, POST /v1/jobs) likewise refuse a body that
is not JSON."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request

from app.errors import ApiError

MULTIPART = "multipart/form-data"
URLENCODED = "application/x-www-form-urlencoded"


def multipart_body(curl_form: str, urlencoded_too: bool = False) -> Callable[[Request], None]:
    """A route dependency: 415 unless the body is multipart/form-data. `curl_form` is the route's `-F ...`
    example; `urlencoded_too` also lets a plain HTML-style form through, for a route whose uploads are optional
    (recommend by stored ids alone)."""
    accepted = (MULTIPART, URLENCODED) if urlencoded_too else (MULTIPART,)

    def check(request: Request) -> None:
        media_type = _media_type(request)
        if media_type in accepted:
            return
        url = str(request.url.replace(query=""))
        raise ApiError(415, f"{request.method} {request.url.path} takes multipart/form-data (the image and the "
                            f"options as form fields), not {_sent(media_type)}: curl {curl_form} {url}",
                       detail={"content_type": media_type or None, "accepted": list(accepted)})

    return check


def json_body(curl_form: str) -> Callable[[Request], None]:
    """A route dependency: 415 unless the body is JSON (application/json or a +json type). A form-encoded body,
    what `curl -d` sends unless told otherwise, would fail with "Input should be a valid dictionary", which says
    nothing of what to send. `curl_form` is the route's `-d ...` example."""

    def check(request: Request) -> None:
        media_type = _media_type(request)
        if media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json")):
            return
        url = str(request.url.replace(query=""))
        raise ApiError(415, f"{request.method} {request.url.path} takes a JSON body, not {_sent(media_type)}: curl -X "
                            f"{request.method} -H 'Content-Type: application/json' -d '{curl_form}' {url}",
                       detail={"content_type": media_type or None, "accepted": ["application/json"]})

    return check


def _media_type(request: Request) -> str:
    """The request's Content-Type without its parameters (boundary, charset), lower case; "" when there is none."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _sent(media_type: str) -> str:
    return f"a body of {media_type}" if media_type else "a body without a Content-Type"
