"""cluster/: every config checked by the schema of the tool that reads it, resource names that
cannot drift from actors/config.py, and autoscaling for real on one machine
(`ray.cluster_utils.AutoscalingCluster`, Serve replica autoscaling)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request

import pytest
import ray
import yaml
from ray import serve
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from actors.config import DRAFT_RESOURCE, TARGET_RESOURCE, PipelineConfig, ServerConfig

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
    for group in [head, *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in container.get("env", [])}
        assert secrets == {"CDSL_API_KEY": "api-key", "HF_TOKEN": "hf-token"}, group  # auth on every replica
        if container["resources"]["limits"].get("nvidia.com/gpu"):
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}, group  # NCCL's shared memory
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


@pytest.mark.slow
def test_autoscaler_adds_draft_and_target_nodes_then_removes_them(model_dirs):
    """No worker nodes at first; a pipeline with `placement: required` makes the autoscaler add
    one node of each type, generation runs on them, and idle nodes go after the timeout. Run in
    its own process: Ray fixes its auth mode per process, and this cluster's differs."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # the cluster runs `ray start`
    run = subprocess.run([str(BIN / "python"), "-m", "tests.autoscaling_scenario", str(model_dirs["llama-target"]),
                          str(model_dirs["llama-draft"])], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["workers_before"] == 0
    assert DRAFT_RESOURCE in got["draft_node_resources"] and TARGET_RESOURCE in got["target_node_resources"]
    assert got["tokens"] > 0 and got["draft_calls"] > 0
    assert got["workers_after_idle"] == 0


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _replicas(app: str = "cdsl") -> int:
    return serve.status().applications[app].deployments["CDSLServer"].replica_states.get("RUNNING", 0)


@pytest.mark.slow
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
            "downscale_delay_s": 5, "look_back_period_s": 12}).bind(ServerConfig(pipeline=pipeline).model_dump())
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

