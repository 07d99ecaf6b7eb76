"""The one bearer-token parser (service/auth.py), its cases once: the scheme's case,
spaces, several Authorization headers, another scheme, and a token in the query string
(never read). Through the real admin route, and through ``bearer`` itself."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict
from server_fixtures import make_client  # noqa: F401
from server_util import TOKEN, MakeClient

from spectralmc_server.service.auth import bearer

ADMIN = "/v1/admin/models/gbm"


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        ([("Authorization", "Bearer abc")], "abc"),
        ([("Authorization", "bearer abc")], "abc"),
        ([("Authorization", "BEARER abc")], "abc"),
        ([("Authorization", "Bearer    abc  ")], "abc"),  # spaces around the token
        ([("Authorization", "  Bearer abc")], "abc"),  # and before the scheme
        ([("Authorization", "Bearer")], None),
        ([("Authorization", "Bearer   ")], None),
        ([("Authorization", "Basic dXNlcjpwYXNz")], None),
        ([("Authorization", "abc")], None),
        ([("Authorization", "Bearer\tabc")], None),  # the scheme ends at a space (RFC 7235)
        ([("Authorization", "Bearer abc"), ("Authorization", "Bearer abc")], None),  # several: refused
        ([("Authorization", "Bearer abc"), ("Authorization", "Bearer xyz")], None),
        ([], None),
    ],
)
def test_bearer(headers: list[tuple[str, str]], token: str | None) -> None:
    request = make_mocked_request("GET", "/v1/admin/models/gbm/versions", headers=CIMultiDict(headers))
    assert bearer(request) == token


def test_a_query_string_token_is_never_read() -> None:
    request = make_mocked_request("GET", f"/v1/admin/models/gbm/versions?access_token={TOKEN}")
    assert bearer(request) is None


async def test_the_cases_through_the_admin_route(make_client: MakeClient) -> None:  # noqa: F811
    client = await make_client(models=["gbm"])
    ok = await client.get(f"{ADMIN}/versions", headers={"Authorization": f"  bearer   {TOKEN} "})
    assert ok.status == 200, await ok.text()
    refused = [
        await client.get(f"{ADMIN}/versions?access_token={TOKEN}"),
        await client.get(
            f"{ADMIN}/versions",
            headers=CIMultiDict([("Authorization", f"Bearer {TOKEN}"), ("Authorization", f"Bearer {TOKEN}")]),
        ),
        await client.get(f"{ADMIN}/versions", headers={"Authorization": f"Token {TOKEN}"}),
    ]
    for r in refused:
        assert r.status == 401, await r.text()
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="spectralmc-admin"'
    wrong = await client.get(f"{ADMIN}/versions", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status == 403
