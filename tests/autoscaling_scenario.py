"""The autoscaling scenario of tests/test_cluster.py, run in a process of its own:
`python -m tests.autoscaling_scenario TARGET_DIR DRAFT_DIR` prints one JSON line of findings."""

from __future__ import annotations

import json
import sys
import time

import ray
from ray.cluster_utils import AutoscalingCluster

from actors.config import DRAFT_RESOURCE, TARGET_RESOURCE, PipelineConfig
from actors.pipeline import Pipeline
from cdsl.config import DecodeConfig, ModelConfig
from cdsl.constraints import RewardSpec
from cdsl.request import Request


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


def alive_workers() -> int:
    return sum(1 for n in ray.nodes() if n["Alive"]) - 1


def main(target: str, draft: str) -> dict:
    node = {"node_config": {}, "min_workers": 0, "max_workers": 1}
    cluster = LocalAutoscalingCluster(
        head_resources={"CPU": 1},
        worker_node_types={"draft_gpu_node": {"resources": {"CPU": 1, DRAFT_RESOURCE: 1}, **node},
                           "target_gpu_node": {"resources": {"CPU": 1, TARGET_RESOURCE: 1}, **node}},
        idle_timeout_minutes=0.1)
    cluster.start()
    try:
        ray.init("auto", log_to_driver=False)
        found = {"workers_before": alive_workers()}
        config = PipelineConfig(target=ModelConfig(path=target), draft=ModelConfig(path=draft), placement="required")
        pipe = Pipeline(config)  # pending until the autoscaler has added the nodes
        try:
            where = pipe.placement()
            # tau_r = 0: every round speculates, so the draft node does work too
            cfg = DecodeConfig(max_new_tokens=8, tau_reward=0.0)
            spec = RewardSpec(concepts=["dog", "frisbee"])
            out = pipe.generate(Request("Concepts: dog, frisbee\nSentence:", cfg, spec))
        finally:
            pipe.shutdown()
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        found.update(draft_node_resources=nodes[where["draft"]["node_id"]],
                     target_node_resources=nodes[where["target"][0]["node_id"]],
                     tokens=out.stats.tokens, draft_calls=out.stats.draft_calls)
        deadline = time.monotonic() + 180
        while alive_workers() and time.monotonic() < deadline:
            time.sleep(1)
        found["workers_after_idle"] = alive_workers()
        return found
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
