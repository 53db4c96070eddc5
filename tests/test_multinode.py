"""Several Ray nodes on one machine: workers land on the nodes offering their resources."""

import ray
from ray.cluster_utils import Cluster

from actors.config import DRAFT_RESOURCE, TARGET_RESOURCE
from actors.pipeline import Pipeline
from cdsl.config import ModelConfig
from cdsl.models import LM

from .test_pipeline import config, reference, requests


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
