"""What routes take from a request: its SQL session, the deployment it runs on, the batcher, filters, and k
checked against settings.max_k. The query pipeline itself is app/serving.py."""

from __future__ import annotations

import difflib
import types
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Union, get_args, get_origin

from fastapi import Depends, Form, Query, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.orm import Session

from app.batching import AdmissionGate, MicroBatcher
from app.db.session import session_scope
from app.deployment import Deployment
from app.errors import ApiError
from app.ranking import DIVERSIFY_DOC, EFFORT_DOC, MMR_DOC, OFFSET_DOC, PER_GROUP_DOC, Effort, Ranking, parse_diversify
from app.schemas import no_label_if_empty
from app.serving import Filters, parse_meta_filters

META_FILTER_DOC = ("Metadata filters, each `key=value` (repeat for AND; the key is everything before the first `=`): "
                   "a string matches exactly, a boolean `true`/`false`, a null `null`, a number any value equal to "
                   "it (`year=2021`, `big=1e20`); see docs/api.md.")
LABEL_DOC = "Only images with exactly this label; empty means no label filter."
MIN_SCORE_DOC = "Drop results scoring below this cosine similarity (-1..1)."
DEFAULT_K = 10
K_DOC = (f"How many neighbours to return: 1..RETRIEVAL_MAX_K (a setting, 100 unless configured). Default "
         f"{DEFAULT_K}, or RETRIEVAL_MAX_K when that is lower.")


def _body_fields(dependant: Any) -> dict[str, Any]:
    """The fields a route's multipart body takes, by name, its sub-dependencies' included."""
    fields = {field.alias: field for field in dependant.body_params}
    for sub in dependant.dependencies:
        fields |= _body_fields(sub)
    return fields


def _repeatable(annotation: Any) -> bool:
    """A field declared as a list (`meta`, `positive_file`) may be sent several times; any other only once."""
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_repeatable(arg) for arg in get_args(annotation))
    return get_origin(annotation) in (list, tuple, set, frozenset) or annotation in (list, tuple, set, frozenset)


async def form_fields_in_the_body(request: Request) -> None:
    """Multipart routes take their options as form fields, and a field they do not take would be ignored without a
    word: one sent in the query string instead (`?k=3`), a misspelt one (`-F K=3`, `-F top_k=3`), a second
    `file`. Each is refused with a 422 that says what to send instead."""
    fields = _body_fields(request.scope["route"].dependant)
    misplaced = sorted(set(request.query_params) & set(fields))
    if misplaced:
        names = ", ".join(misplaced)
        example = " ".join(f"-F {name}={request.query_params[name]}" for name in misplaced)
        raise ApiError(422, f"{names} must be sent as multipart form fields with the upload, not in the query "
                            f"string (curl: {example})", detail={"query_parameters": misplaced})
    form = await request.form()  # already parsed for the route (FastAPI reads the body first); this is its cache
    accepted = sorted(fields)
    unknown = sorted(set(form.keys()) - set(fields))
    if unknown:
        named = []
        for name in unknown:
            close = [f for f in accepted if f.lower() == name.lower()] or difflib.get_close_matches(name, accepted, 1)
            named.append(f"{name} (did you mean {close[0]}?)" if close else name)
        plural = "s" if len(unknown) > 1 else ""
        raise ApiError(422, f"unknown form field{plural} {', '.join(named)}: {request.method} "
                            f"{request.url.path} takes {', '.join(accepted)}",
                       detail={"unknown_fields": unknown, "accepted": accepted})
    repeated = {name: len(form.getlist(name)) for name in form.keys()
                if len(form.getlist(name)) > 1 and not _repeatable(fields[name].field_info.annotation)}
    if "file" in repeated:
        raise ApiError(422, f"one file per request: this one has {repeated['file']} `file` parts; send each image in a "
                            "request of its own",
                       detail={"repeated_fields": repeated})
    if repeated:
        names = ", ".join(f"{name} ({count} times)" for name, count in sorted(repeated.items()))
        raise ApiError(422, f"a form field sent more than once is taken once only: {names}",
                       detail={"repeated_fields": repeated})


def get_session(request: Request) -> Iterator[Session]:
    """The request's SQL session: committed when the route returns, before the response is sent (scope
    "function" below), rolled back when it raises. Writes that must be durable at a precise moment (under the
    write lock) commit explicitly."""
    with session_scope(request.app.state.database_url) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_deployment(request: Request) -> Deployment:
    """The pair this request runs on, taken once: a hot swap during the request does not change it."""
    deployment = getattr(request.app.state, "deployment", None)
    if deployment is None:
        raise not_ready(request)
    return deployment


def not_ready(request: Request) -> ApiError:
    """503 while no pair serves: none built yet, or the active one failed to load (why, as /readyz says)."""
    load_error = request.app.state.serving.load_error
    message = (f"{load_error} (details in /readyz)" if load_error
               else "no index is active yet: build one with `retrieval index build SOURCE`")
    return ApiError(503, message, code="not_ready", headers={"Retry-After": "30"})


def get_batcher(request: Request) -> MicroBatcher:
    return request.app.state.batcher


def explain_gate(request: Request) -> AdmissionGate:
    """The admission limit of explain heatmaps (they bypass the batcher): a 503 like a full queue's past it."""
    return request.app.state.explain_gate


def check_k(request: Request, k: int | None, where: str, offset: int = 0) -> int:
    """The k a search runs with: the one asked for, else DEFAULT_K or settings.max_k when that is lower. k within
    settings.max_k and an offset below it, or the same 422 a declared bound gives (its JSON body names k, or
    offset). A page that would reach past max_k stops there (a shorter last page, without next_offset): the
    next_offset a full page hands out, asked for with the same k, is always answered."""
    max_k = request.app.state.settings.max_k
    if k is None:
        k = min(DEFAULT_K, max_k)
    if k > max_k:
        raise RequestValidationError([{"loc": (where, "k"), "msg": f"Input should be less than or equal to {max_k}",
                                       "type": "less_than_equal", "input": k, "ctx": {"le": max_k}}])
    if offset >= max_k:
        raise RequestValidationError([{"loc": (where, "offset"), "type": "less_than", "input": offset,
                                       "msg": f"offset must be below RETRIEVAL_MAX_K ({max_k}), the deepest a search "
                                              f"pages; got {offset}"}])
    return min(k, max_k - offset)


def _ranking_dep(param: Callable[..., Any], where: str) -> Callable[..., Ranking]:
    """The ranking options (app/ranking.py) as form fields (POST) or query parameters (GET)."""

    def dep(
        request: Request,
        offset: int = param(0, ge=0, le=10_000, description=OFFSET_DOC),
        effort: Effort = param("balanced", description=EFFORT_DOC),
        diversify: str | None = param(None, max_length=80, description=DIVERSIFY_DOC),
        per_group: int = param(1, ge=1, le=1000, description=PER_GROUP_DOC),
        mmr: float | None = param(None, ge=0.0, le=1.0, description=MMR_DOC),
    ) -> Ranking:
        return Ranking(offset=offset, effort=effort, diversify=parse_diversify(diversify, where),
                       per_group=per_group, mmr=mmr, deepest=request.app.state.settings.max_k)

    return dep


ranking_form = _ranking_dep(Form, "body")
ranking_query = _ranking_dep(Query, "query")


def filters_dep(
    label: str | None = Query(None, max_length=255, description=LABEL_DOC),
    meta: list[str] = Query([], description=META_FILTER_DOC),
) -> Filters:
    return Filters(label=no_label_if_empty(label), meta=parse_meta_filters(meta))
