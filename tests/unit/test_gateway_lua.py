"""The gateway's Lua shedding script, run in LuaJIT (Envoy's Lua engine) with stand-ins for Envoy's handles.

The stand-ins are the few handle methods the script calls (``headers()``, ``trailers()``,
``get``, ``replace``, ``remove``, ``streamInfo():dynamicMetadata()``); the script itself is exactly
what ``render_envoy`` puts in the config.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from lupa import luajit21
from tritonclient.grpc import service_pb2

from inferline.core import headers
from inferline.core.config import parse_config
from inferline.gateway import render_envoy
from inferline.gateway.render import SIGNAL_FILTER, SIGNAL_SHED_HEADER
from tests.unit.test_gateway_render import DEFAULT

PREDICT = "/inferline.v1.Inference/Predict"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"

# Envoy's handles, reduced to what the script uses; ``draw`` stands in for math.random.
HANDLES = """
local function header_map(t)
  return {
    get = function(self, key) return t[key] end,
    replace = function(self, key, value) t[key] = value end,
    remove = function(self, key) t[key] = nil end,
  }
end
-- One stream's dynamic metadata: what the request phase sets, the response phase reads.
function metadata(store)
  local dynamic = {
    set = function(self, filter, key, value)
      store[filter] = store[filter] or {}
      store[filter][key] = value
    end,
    get = function(self, filter) return store[filter] end,
  }
  return {dynamicMetadata = function(self) return dynamic end}
end
-- A request body as Envoy's buffer: length() and getBytes(index, length), which fails past the end.
local function buffer(bytes)
  return {
    length = function(self) return #bytes end,
    getBytes = function(self, index, length)
      assert(index + length <= #bytes, "getBytes past the end of the buffer")
      return string.sub(bytes, index + 1, index + length)
    end,
  }
end
-- As in Envoy, body() suspends the script until the body is in, and header objects taken
-- before it are out of scope after it: using one fails.
function request(t, store, body)
  local info = metadata(store)
  local taken = {}
  return {
    headers = function(self)
      local map = header_map(t)
      local scoped = {in_scope = true}
      for name, method in pairs(map) do
        scoped[name] = function(me, ...)
          assert(scoped.in_scope, "object used outside of proper scope")
          return method(map, ...)
        end
      end
      table.insert(taken, scoped)
      return scoped
    end,
    streamInfo = function(self) return info end,
    body = function(self)
      for _, scoped in ipairs(taken) do scoped.in_scope = false end
      if body == nil then return nil end
      return buffer(body)
    end,
  }
end
function response(h, trailers, store)
  local map = header_map(h)
  local info = metadata(store)
  return {
    headers = function(self) return map end,
    trailers = function(self) if trailers == nil then return nil end return header_map(trailers) end,
    streamInfo = function(self) return info end,
  }
end
draw = 0.5
math.random = function() return draw end
-- The script's per-class probabilities: a local of its chunk, an upvalue of envoy_on_request.
function shed_probabilities()
  local i = 1
  while true do
    local name, value = debug.getupvalue(envoy_on_request, i)
    if name == nil or name == "shed_p" then return value end
    i = i + 1
  end
end
"""


class Script:
    """The rendered script loaded into a fresh LuaJIT state (one Envoy worker's)."""

    def __init__(self, *, lane: bool = False, **gateway: Any) -> None:
        """``lane``: rendered with a protected lane (``gateway.protected_routers``)."""
        raw = yaml.safe_load(DEFAULT.read_text())
        raw["gateway"] = {"shed": {"batch": {}, "standard": {}}, **gateway}
        rendered = render_envoy(parse_config(raw, DEFAULT.parent), protected_routers=["127.0.0.1:2"] if lane else [])
        hcm = rendered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        [lua] = [f for f in hcm["http_filters"] if f["name"] == SIGNAL_FILTER]
        self.lua = luajit21.LuaRuntime(unpack_returned_tuples=True)
        self.lua.execute(HANDLES)
        self.lua.execute(lua["typed_config"]["default_source_code"]["inline_string"])
        self.g = self.lua.globals()

    def answer(
        self,
        overloaded: str | None,
        *,
        in_trailers: bool = True,
        path: str = PREDICT,
        body: bytes | None = None,
        traffic_class: str | None = None,
    ) -> None:
        """One answer to a call of ``path`` (with ``body``, naming ``traffic_class``) through
        ``envoy_on_response``: the signal in its trailers (or headers), or none. The stream's
        metadata is what ``envoy_on_request`` left for it."""
        store = self.lua.table_from({})
        sent = {":path": path} | ({} if traffic_class is None else {headers.TRAFFIC_CLASS: traffic_class})
        self.g.envoy_on_request(self.g.request(self.lua.table_from(sent), store, body))
        signal = {} if overloaded is None else {headers.OVERLOADED: overloaded}
        head = self.lua.table_from({":status": "200", **({} if in_trailers else signal)})
        trailers = self.lua.table_from({"grpc-status": "0", **(signal if in_trailers else {})})
        self.g.envoy_on_response(self.g.response(head, trailers, store))

    def shed(
        self, traffic_class: str | None, draw: float = 0.5, path: str = PREDICT, body: bytes | None = None, **sent: str
    ) -> bool:
        """Whether ``envoy_on_request`` marks a request of ``traffic_class`` to ``path``, with headers
        ``sent`` and ``body``, for the fault."""
        self.g.draw = draw
        request = {":path": path, **sent}
        if traffic_class is not None:
            request[headers.TRAFFIC_CLASS] = traffic_class
        table = self.lua.table_from(request)
        self.g.envoy_on_request(self.g.request(table, self.lua.table_from({}), body))
        marked = table[SIGNAL_SHED_HEADER]
        if marked is not None:
            assert marked == traffic_class
            assert table["x-envoy-downstream-service-cluster"] == traffic_class  # the fault filter counts per class
        return marked is not None

    def p(self, traffic_class: str, path: str = PREDICT) -> float:
        """The class's shed probability for calls keyed ``path`` (``path#model`` for a KServe model),
        read off the script's own table."""
        by_class = self.g.shed_probabilities()[path]
        return 0.0 if by_class is None else float(by_class[traffic_class])


def test_nothing_is_shed_until_a_router_says_so() -> None:
    script = Script()
    assert not script.shed("batch", draw=0.0)
    script.answer("")
    assert not script.shed("batch", draw=0.0)


def test_each_answer_naming_a_class_raises_its_shed_probability_by_step_up() -> None:
    script = Script(signal={"step_up": 0.1, "step_down": 0.01})
    for _ in range(3):
        script.answer("batch")
    assert script.p("batch") == pytest.approx(0.3, abs=1e-6)
    assert script.p("standard") == pytest.approx(0.0, abs=1e-6)  # not named: stays at 0, never negative


def test_the_probability_is_capped_and_decays_on_answers_that_do_not_name_the_class() -> None:
    script = Script(signal={"step_up": 0.5, "step_down": 0.1, "max_probability": 0.9})
    for _ in range(5):
        script.answer("batch,standard")
    assert script.p("batch") == pytest.approx(0.9, abs=1e-6)
    script.answer("batch")  # standard recovers first: the router sheds it no longer
    script.answer("batch")
    assert script.p("standard") == pytest.approx(0.7, abs=1e-6)
    assert script.p("batch") == pytest.approx(0.9, abs=1e-6)
    for _ in range(20):
        script.answer("")
    assert script.p("batch") == pytest.approx(0.0, abs=1e-6)


def test_answers_from_a_protected_lane_only_raise_the_lower_classes_probabilities() -> None:
    # The lane's routers never see batch or standard calls: their silence about those classes
    # says nothing, but their naming them (critical calls missing) must still shed.
    script = Script(lane=True, signal={"step_up": 0.1, "step_down": 0.05})
    script.answer("batch", traffic_class="standard")
    script.answer("", traffic_class="critical")
    assert script.p("batch") == pytest.approx(0.1, abs=1e-6)
    script.answer("batch,standard", traffic_class="critical")
    assert (script.p("batch"), script.p("standard")) == pytest.approx((0.2, 0.1), abs=1e-6)
    script.answer("", traffic_class="standard")  # a shared router's silence lowers, as without a lane
    script.answer("")  # so does a call without a class (the shared routers take it)
    assert script.p("batch") == pytest.approx(0.1, abs=1e-6)
    # Without a lane every router takes every class, and a critical call's answer lowers too.
    plain = Script(signal={"step_up": 0.1, "step_down": 0.05})
    plain.answer("batch", traffic_class="standard")
    plain.answer("", traffic_class="critical")
    assert plain.p("batch") == pytest.approx(0.05, abs=1e-6)


def test_a_request_is_shed_when_its_draw_falls_under_the_probability() -> None:
    script = Script(signal={"step_up": 0.5})
    script.answer("batch")
    assert script.shed("batch", draw=0.49)
    assert not script.shed("batch", draw=0.51)


def test_classes_the_gateway_may_not_shed_and_requests_without_a_class_pass() -> None:
    script = Script(signal={"step_up": 1.0})
    script.answer("batch,standard,critical")
    assert not script.shed("critical", draw=0.0)  # not in gateway.shed
    assert not script.shed(None, draw=0.0)  # no class header: health checks, reflection
    assert script.shed("standard", draw=0.0)


def test_the_signal_is_read_from_headers_of_trailers_only_answers_and_names_match_whole() -> None:
    script = Script(signal={"step_up": 0.25, "step_down": 0.005})
    script.answer("batch", in_trailers=False)  # a shed: status and metadata in one HEADERS frame
    assert script.p("batch") == pytest.approx(0.25, abs=1e-6)
    script.answer("batchy,standard2")  # other names that merely contain a class's name
    assert script.p("batch") == pytest.approx(0.245, abs=1e-6)
    assert script.p("standard") == pytest.approx(0.0, abs=1e-6)


def test_answers_without_the_signal_move_nothing() -> None:
    script = Script(signal={"step_up": 0.25})
    script.answer("batch")
    script.answer(None)  # another upstream, or the gateway's own reply
    store = script.lua.table_from({})
    script.g.envoy_on_request(script.g.request(script.lua.table_from({":path": PREDICT}), store))
    script.g.envoy_on_response(script.g.response(script.lua.table_from({":status": "200"}), None, store))
    assert script.p("batch") == pytest.approx(0.25, abs=1e-6)


def test_a_callers_own_shed_mark_is_dropped() -> None:
    # Only the script may mark a request for the fault filter: a caller sending the header
    # (by mistake, or copying a request it saw) is not turned away while nothing is shed.
    script = Script()
    for traffic_class in ("batch", "critical", None):
        assert not script.shed(traffic_class, draw=0.0, **{SIGNAL_SHED_HEADER: "batch"})


def test_each_method_has_its_own_shed_probabilities() -> None:
    # An overloaded KServe front door (its models' admission) sheds its own lower classes, not Predict's.
    script = Script(signal={"step_up": 0.5, "step_down": 0.01})
    script.answer("batch", path=MODEL_INFER)
    assert script.p("batch", path=MODEL_INFER) == pytest.approx(0.5, abs=1e-6)
    assert script.p("batch", path=PREDICT) == 0.0
    assert script.shed("batch", draw=0.1, path=MODEL_INFER)
    assert not script.shed("batch", draw=0.0, path=PREDICT)
    script.answer("", path=PREDICT)  # Predict's answers move only Predict's probabilities
    assert script.p("batch", path=MODEL_INFER) == pytest.approx(0.5, abs=1e-6)


def infer_body(model: str, *, compressed: bool = False) -> bytes:
    """A ModelInfer call's body as a Triton client sends it: the gRPC frame header, then the message."""
    message = service_pb2.ModelInferRequest(
        model_name=model, id="7", inputs=[service_pb2.ModelInferRequest.InferInputTensor(name="x", shape=[1, 4])]
    ).SerializeToString()
    return bytes([1 if compressed else 0]) + len(message).to_bytes(4, "big") + message


def test_each_kserve_model_has_its_own_shed_probabilities() -> None:
    # The routers admit KServe calls per model: one model's overload must not shed another's calls.
    script = Script(signal={"step_up": 0.5, "step_down": 0.01})
    script.answer("batch", path=MODEL_INFER, body=infer_body("driver_ranker"))
    assert script.p("batch", path=f"{MODEL_INFER}#driver_ranker") == pytest.approx(0.5, abs=1e-6)
    assert script.shed("batch", draw=0.1, path=MODEL_INFER, body=infer_body("driver_ranker"))
    assert not script.shed("batch", draw=0.0, path=MODEL_INFER, body=infer_body("driver_ranker_light"))
    assert not script.shed("batch", draw=0.0, path=PREDICT)
    script.answer("", path=MODEL_INFER, body=infer_body("driver_ranker_light"))  # moves only its own model's
    assert script.p("batch", path=f"{MODEL_INFER}#driver_ranker") == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize(
    "body",
    [None, b"", infer_body("driver_ranker", compressed=True), infer_body("m" * 200), b"\x00\x00\x00\x00\x02\x0a"],
    ids=["no_body", "empty", "compressed", "long_name", "truncated"],
)
def test_a_kserve_body_without_a_readable_model_falls_back_to_the_methods_key(body: bytes | None) -> None:
    script = Script(signal={"step_up": 0.5, "step_down": 0.01})
    script.answer("batch", path=MODEL_INFER, body=body)
    assert script.p("batch", path=MODEL_INFER) == pytest.approx(0.5, abs=1e-6)
    assert script.shed("batch", draw=0.1, path=MODEL_INFER, body=body)
    assert not script.shed("batch", draw=0.0, path=MODEL_INFER, body=infer_body("driver_ranker"))
