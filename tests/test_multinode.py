"""Several Ray nodes on one machine: workers land on the nodes offering their resources."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from actors.config import DRAFT_RESOURCE, TARGET_RESOURCE
from actors.pipeline import Pipeline
from cdsl.config import ModelConfig
from cdsl.models import LM

from .test_generate_job import ROOT, write_config
from .test_pipeline import config, reference, requests

pytestmark = pytest.mark.slow  # starts Ray (make test-fast skips it)


def test_workers_placed_by_resource_and_generation_crosses_nodes(model_dirs, pairs):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    draft_node = cluster.add_node(num_cpus=1, resources={DRAFT_RESOURCE: 1})
    target_node = cluster.add_node(num_cpus=2, resources={TARGET_RESOURCE: 2})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        pipe = Pipeline(config(model_dirs, target_tp=2, dtype="float32", placement="required"))
        try:
            where = pipe.placement()
            reqs = requests(5)
            outs = pipe.generate_many(reqs)
        finally:
            pipe.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert where["draft"]["node_id"] == draft_node.node_id
    assert [w["node_id"] for w in where["target"]] == [target_node.node_id] * 2
    target = LM.load(ModelConfig(path=str(model_dirs["llama-target"]), dtype="float32"))
    assert [o.token_ids for o in outs] == reference((target, pairs["llama"][1]), reqs)


def test_dataset_job_puts_one_replica_on_each_node(tmp_path, model_dirs):
    """Two nodes each offering a draft and a target slot: `--replicas 2` packs one whole pipeline
    onto each, and both answer rows."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"concepts": ["dog", f"w{i}"]}) + "\n" for i in range(16)))
    cfg = write_config(tmp_path / "cfg.yaml", model_dirs, max_new_tokens=4)
    doc = yaml.safe_load(cfg.read_text())
    doc["cdsl"]["placement"] = "required"
    cfg.write_text(yaml.safe_dump(doc))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=2, resources={DRAFT_RESOURCE: 1, TARGET_RESOURCE: 1}) for _ in range(2)]
    try:
        res = subprocess.run([sys.executable, "-m", "jobs.generate", "--input", str(src), "--output",
                              str(tmp_path / "out"), "--config", str(cfg), "--replicas", "2", "--batch-size", "2"],
                             cwd=ROOT, env={**os.environ, "RAY_ADDRESS": cluster.address}, capture_output=True,
                             text=True, timeout=600)
    finally:
        cluster.shutdown()
    assert res.returncode == 0, res.stderr[-3000:]
    replicas = json.loads((tmp_path / "out" / "summary.json").read_text())["methods"]["greedy"]["replicas_this_run"]
    assert sorted(r["node"] for r in replicas.values()) == sorted(n.node_id for n in nodes)
    assert all(r["rows"] > 0 for r in replicas.values()) and sum(r["rows"] for r in replicas.values()) == 16
    rows = pq.read_table(tmp_path / "out" / "greedy").to_pylist()
    assert sorted(r["row"] for r in rows) == list(range(16)) and {r["replica"] for r in rows} == set(replicas)
