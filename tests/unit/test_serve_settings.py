"""One serving setup as settings objects (prefixport/server/settings.py): the CLI and a Ray Serve
config build the same `ServeSettings` from the same flat names, sizes in MiB; what Ray cannot do
is refused with the reason; an API error crosses a process boundary whole (headers too)."""

from __future__ import annotations

import pickle

import pytest
from click.testing import CliRunner

from prefixport.cli import main
from prefixport.errors import PrefixportError
from prefixport.runtime import BackendSettings
from prefixport.server import AccessSettings, ServeSettings
from prefixport.server.protocol import ApiError
from prefixport.server.responses import error_response

MiB = 2**20


def test_flat_options_make_every_object_sizes_in_mib(tmp_path):
    s = ServeSettings.from_options(tmp_path, max_batch=4, max_body_mb=2, adapter_budget_mb=1.5, kv_cache_mb=64,
                                   prompt_cache_mb=0, max_context=256, max_stops=6,
                                   speculative=f"draft:{tmp_path / 'draft'}", speculate_max_batch=3,
                                   backend=BackendSettings(threads=2), replicas=2, replica_cpus=1.5)
    assert s.server.max_body_bytes == 2 * MiB and s.engine.adapter_budget_bytes == int(1.5 * MiB)
    assert s.engine.cache_settings.budget_bytes == 64 * MiB and s.engine.prompt_cache_bytes == 0
    assert s.engine.cache_settings.max_rows == s.server.max_batch == 4 and s.engine.cache_settings.max_context == 256
    assert s.server.limits.max_stops == 6 and s.server.speculate_max_batch == 3
    assert s.server.speculative == "draft" and s.engine.draft == (tmp_path / "draft").resolve()
    assert s.server.adapters_dir == (tmp_path / "adapters").resolve()  # the default, resolved here
    assert s.engine.backend.threads == 2 and s.ray.replicas == 2 and s.ray.replica_cpus == 1.5
    assert s.with_threads(1).engine.backend.threads == 1 and s.engine.backend.threads == 2  # frozen


def test_a_serve_config_builds_the_same_settings_as_the_command_line(tmp_path):
    pytest.importorskip("ray")
    from prefixport.server.ray_serve import AppArgs

    flat = {"max_batch": 4, "max_body_mb": 0.5, "adapter_budget_mb": 3, "speculative": "prompt-lookup",
            "speculate_max_batch": 2, "max_waiting": 7}
    options = AppArgs(outdir=str(tmp_path), **flat).model_dump()
    for name in ("outdir", "backend", "provider", "device", "precision", "threads"):
        options.pop(name)
    assert ServeSettings.from_options(tmp_path, **options) == ServeSettings.from_options(tmp_path, **flat)


def test_what_ray_cannot_do_is_refused_with_the_reason(tmp_path):
    with pytest.raises(PrefixportError, match="registers adapters from the adapters folder on demand"):
        ServeSettings.from_options(tmp_path, allow_adapter_admin=True).check_ray()
    with pytest.raises(PrefixportError, match="no penalty box"):
        ServeSettings.from_options(tmp_path, max_refused_per_minute=10).check_ray()
    ServeSettings.from_options(tmp_path, speculate_max_batch=2, max_waiting=3).check_ray()  # these go to replicas
    with pytest.raises(PrefixportError, match="--route-prefix must start with '/'"):
        ServeSettings.from_options(tmp_path, route_prefix="v1")
    with pytest.raises(PrefixportError, match="give --keys or --api-key, not both"):
        AccessSettings(api_key="k", keys_file=tmp_path / "keys.toml")


def test_the_cli_refuses_ray_options_without_ray_before_loading_anything(tmp_path):
    for option in (["--replicas", "2"], ["--replica-cpus", "1"], ["--app-name", "x"]):
        r = CliRunner().invoke(main, ["serve", str(tmp_path), *option])
        assert r.exit_code == 2 and f"{option[0]} go with --ray" in r.output, r.output


def test_an_api_error_crosses_a_pickle_whole_and_a_503_says_retry_after():
    error = ApiError(429, "slow down", "rate_limit_error", code="rate_limited", headers={"Retry-After": "3"})
    again = pickle.loads(pickle.dumps(error))  # as a Ray replica's error reaches the ingress
    assert (again.status, again.body, again.headers) == (error.status, error.body, error.headers)
    assert error_response(again).headers["retry-after"] == "3"
    busy = error_response(ApiError(503, "busy", "server_error", code="overloaded"))
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"


def test_a_request_id_not_internals_in_an_unexpected_error():
    response = error_response(RuntimeError("secret /home/ops/keys.toml pid 4242"))
    text = bytes(response.body).decode()
    assert response.status_code == 500 and "secret" not in text and "RuntimeError" not in text
    assert response.headers["x-request-id"] in text

