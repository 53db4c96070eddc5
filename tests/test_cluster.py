"""cluster/: every config checked by the schema of the tool that reads it, resource names that
cannot drift from actors/config.py, and autoscaling for real on one machine
(`ray.cluster_utils.AutoscalingCluster`, Serve replica autoscaling)."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request

import pytest
import ray
import yaml
from ray import serve
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.cluster_utils import AutoscalingCluster
from ray.serve.schema import ServeDeploySchema

from actors.config import DRAFT_RESOURCE, TARGET_RESOURCE, PipelineConfig, ServerConfig
from actors.pipeline import Pipeline
from cdsl.config import DecodeConfig, ModelConfig
from cdsl.engine import Request
from cdsl.rewards import RewardSpec

from .test_generate_job import BIN, ROOT, free_port

CLUSTER = ROOT / "cluster"
CUSTOM = {DRAFT_RESOURCE, TARGET_RESOURCE}


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def kuberay_resources(group: dict) -> dict:
    """Custom resources a KubeRay group advertises (rayStartParams.resources is a quoted JSON string)."""
    raw = group["rayStartParams"].get("resources")
    return json.loads(raw.strip('"').replace('\\"', '"')) if raw else {}


def test_launcher_config_passes_rays_cluster_schema():
    config = load("aws.yaml")
    validate_config(prepare_config(config))  # Ray's own ray-schema.json, after Ray fills its defaults
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["max_workers"] == 0
    for name in ("draft_gpu_node", "target_gpu_node"):
        assert types[name]["min_workers"] == 0 < types[name]["max_workers"], name
    assert config["idle_timeout_minutes"] > 0


def test_resource_names_and_sizes_agree_everywhere():
    """The names the actors ask for are the names every node type offers, and a target node
    offers exactly the tensor-parallel size the GPU config asks for."""
    tp = PipelineConfig.from_yaml(CLUSTER / "gpu.yaml").target_tp
    aws = load("aws.yaml")["available_node_types"]
    offered = {k: v for t in aws.values() for k, v in t["resources"].items()}
    assert set(offered) == CUSTOM
    assert aws["target_gpu_node"]["resources"] == {TARGET_RESOURCE: tp}
    assert aws["draft_gpu_node"]["resources"] == {DRAFT_RESOURCE: 1}
    for manifest in ("rayservice.yaml", "rayjob.yaml"):
        doc = load(f"kuberay/{manifest}")
        spec = doc["spec"].get("rayClusterConfig") or doc["spec"]["rayClusterSpec"]
        groups = {g["groupName"]: kuberay_resources(g) for g in spec["workerGroupSpecs"]}
        assert groups == {"draft-gpu": {DRAFT_RESOURCE: 1}, "target-gpu": {TARGET_RESOURCE: tp}}, manifest
        gpus = {g["groupName"]: g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
                for g in spec["workerGroupSpecs"]}
        assert gpus == {"draft-gpu": 1, "target-gpu": tp}, manifest


@pytest.mark.parametrize("manifest", ["rayservice.yaml", "rayjob.yaml"])
def test_kuberay_manifests_have_the_fields_kuberay_requires(manifest):
    doc = load(f"kuberay/{manifest}")
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    spec = doc["spec"]
    cluster = spec["rayClusterConfig"] if doc["kind"] == "RayService" else spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    for group in [head, *cluster["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        assert container["name"] and container["image"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # KubeRay wants strings
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    if doc["kind"] == "RayService":
        serve_config = yaml.safe_load(spec["serveConfigV2"])
        ServeDeploySchema.model_validate(serve_config)
        assert serve_config["applications"] == load("gpu.yaml")["applications"]  # no drift from gpu.yaml
    else:
        assert doc["kind"] == "RayJob" and spec["entrypoint"].startswith("python -m jobs.generate")
        assert "--config cluster/gpu.yaml" in spec["entrypoint"]


def test_gpu_config_is_a_valid_serve_and_pipeline_config():
    raw = load("gpu.yaml")
    ServeDeploySchema.model_validate(raw)
    server = ServerConfig.from_yaml(CLUSTER / "gpu.yaml")
    assert server.pipeline == PipelineConfig.from_yaml(CLUSTER / "gpu.yaml")
    assert server.pipeline.placement == "required" and server.pipeline.target_num_gpus == 1


class LocalAutoscalingCluster(AutoscalingCluster):
    """Ray's AutoscalingCluster (fake nodes started on this machine on demand). The Ray wheel
    lacks the fake provider's template file that the class reads, so the config is built here."""

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        provider = {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                    "disable_launch_config_check": True}
        empty_lists = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                       "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files",
                       "rsync_exclude", "rsync_filter"]
        config = {"cluster_name": "cdsl-test", "max_workers": 8, "provider": provider, "auth": {}, "docker": {},
                  "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1, "head_node_type": "ray.head.default",
                  "file_mounts": {}, "file_mounts_sync_continuously": False, **{k: [] for k in empty_lists},
                  "available_node_types": {**worker_node_types, "ray.head.default": {
                      "resources": head_resources, "node_config": {}, "max_workers": 0}}}
        config.update(config_kwargs)
        return config


def _alive_workers() -> int:
    return sum(1 for n in ray.nodes() if n["Alive"]) - 1


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_autoscaler_adds_draft_and_target_nodes_then_removes_them(model_dirs, monkeypatch):
    """No worker nodes at first; a pipeline with `placement: required` makes the autoscaler add
    one node of each type, generation runs on them, and idle nodes go after the timeout."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # driver and `ray start` must agree (Ray 2.60)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")  # the cluster runs `ray start`
    cluster = LocalAutoscalingCluster(
        head_resources={"CPU": 1},
        worker_node_types={
            "draft_gpu_node": {"resources": {"CPU": 1, DRAFT_RESOURCE: 1}, "node_config": {},
                               "min_workers": 0, "max_workers": 1},
            "target_gpu_node": {"resources": {"CPU": 1, TARGET_RESOURCE: 1}, "node_config": {},
                                "min_workers": 0, "max_workers": 1},
        },
        idle_timeout_minutes=0.1,
    )
    cluster.start()
    try:
        ray.init("auto", log_to_driver=False)
        assert _alive_workers() == 0
        config = PipelineConfig(target=ModelConfig(path=str(model_dirs["llama-target"])),
                                draft=ModelConfig(path=str(model_dirs["llama-draft"])), placement="required")
        pipe = Pipeline(config)  # pending until the autoscaler has added the nodes
        try:
            where = pipe.placement()
            out = pipe.generate(Request("Concepts: dog, frisbee\nSentence:", DecodeConfig(max_new_tokens=8),
                                        RewardSpec(concepts=["dog", "frisbee"])))
        finally:
            pipe.shutdown()
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        assert DRAFT_RESOURCE in nodes[where["draft"]["node_id"]]
        assert TARGET_RESOURCE in nodes[where["target"][0]["node_id"]]
        assert out.stats.tokens > 0 and out.stats.draft_calls > 0
        _wait(lambda: _alive_workers() == 0, 180, "idle worker nodes to be removed")
    finally:
        ray.shutdown()
        cluster.shutdown()


def _replicas(app: str = "cdsl") -> int:
    return serve.status().applications[app].deployments["CDSLServer"].replica_states.get("RUNNING", 0)


def test_serve_replicas_scale_up_under_load_and_down_after(model_dirs):
    from actors.server import CDSLServer

    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        pipeline = {"target": {"path": str(model_dirs["llama-target"])}, "draft": None, "cpus_per_worker": 0,
                    "decode": {"method": "greedy"}}
        app = CDSLServer.options(autoscaling_config={
            "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1,
            "downscale_delay_s": 5, "look_back_period_s": 2}).bind(ServerConfig(pipeline=pipeline).model_dump())
        serve.run(app, name="cdsl", route_prefix="/")
        assert _replicas() == 1
        stop = threading.Event()
        body = json.dumps({"prompt": "The dog", "max_tokens": 200}).encode()

        def client() -> None:
            while not stop.is_set():
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body)
                urllib.request.urlopen(req, timeout=120).read()

        threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
        for t in threads:
            t.start()
        try:
            _wait(lambda: _replicas() == 2, 180, "a second replica under load")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=120)
        _wait(lambda: _replicas() == 1, 180, "scale-down to one replica after the load")
    finally:
        serve.shutdown()
        ray.shutdown()

