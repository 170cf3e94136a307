"""KServe-only models (``models:``): each tenant's quota of its own per model, and which tenants may call it."""

from __future__ import annotations

import hashlib
import pathlib

import yaml

from inferline.core.auth import Authenticator
from inferline.core.config import InferlineConfig, parse_config
from inferline.router.gate import RequestGate
from inferline.router.kserve import build_model_quota, model_quota_key
from inferline.router.quota import LocalRateLimiter

DEFAULT = pathlib.Path("deploy/local/inferline.yaml")
OWNER_KEY = "owner-key"


def config(**entry: object) -> InferlineConfig:
    raw = yaml.safe_load(DEFAULT.read_text())
    raw["models"] = {"tensors": entry}
    raw["tenants"]["owner"] = {
        "api_key_sha256": [hashlib.sha256(OWNER_KEY.encode()).hexdigest()],
        "models": ["tensors"],
    }
    return parse_config(raw, DEFAULT.parent)


async def test_each_tenant_has_its_own_bucket_for_a_model_with_a_quota() -> None:
    quota = build_model_quota(config(quota={"rate_per_s": 0.001, "burst": 2}))
    assert quota is not None
    owner, demo = model_quota_key("owner", "tensors"), model_quota_key("demo", "tensors")
    assert [(await quota.check(owner)).allowed for _ in range(3)] == [True, True, False]
    refused = await quota.check(owner)
    assert refused.retry_after_s > 0
    assert (await quota.check(demo)).allowed  # another tenant's calls of the model: its own bucket
    assert (await quota.check("owner")).allowed  # the tenant's own quota is another bucket


def test_no_quota_no_buckets() -> None:
    assert build_model_quota(config()) is None


def test_a_model_quota_key_is_not_a_tenants() -> None:
    assert model_quota_key("owner", "tensors") == "owner/kserve:tensors"


def test_the_tenants_that_list_a_model_may_call_it() -> None:
    cfg = config()
    gate = RequestGate(cfg, Authenticator(cfg.tenants, cfg.jwt), LocalRateLimiter(cfg.tenants), {})
    owner, owner_rules = gate.authenticate([("authorization", f"Bearer {OWNER_KEY}")])
    demo, demo_rules = gate.authenticate([("authorization", "Bearer inferline-demo-key")])
    assert (owner, demo) == ("owner", "demo")
    assert owner_rules.models == frozenset({"tensors"}) and owner_rules.routes == frozenset()
    assert "tensors" not in demo_rules.models
    assert {"driver_ranker", "driver_ranker_light"} <= demo_rules.models  # its route's models
