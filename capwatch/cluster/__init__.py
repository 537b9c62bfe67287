"""Caption on a Dask cluster: many workers caption, one coordinator (where the files and the index are) writes.

The coordinator (``capwatch scan DIR --cluster tcp://HOST:8786``) reads each file's snapshot and applies the policy
exactly as a local scan does (:meth:`capwatch.library.process.Processor.prepare`), then sends the image BYTES of one
model batch per Dask task: workers need no access to the photos. A worker captions them with the model it resolved
from its own cache (the same name, revision and precision as the coordinator's, or it refuses) and sends back the
text. The coordinator alone writes files and index, through the same group-committed path as a local scan
(:meth:`Processor.complete`); each file is written only if it is still exactly what was read and sent.

Workers: ``dask worker tcp://HOST:8786 --preload capwatch.cluster`` (the preload only checks that capwatch imports
there and warms its imports). The model is loaded once per worker by :class:`CaptionerPlugin`, which the
coordinator registers with the model it runs; its onnxruntime uses as many intra-op threads as the worker has
threads, and the worker captions one batch at a time.

Failure: a batch lives in its Dask task until a result comes back, so a worker that dies mid-batch has the batch
redone elsewhere by the scheduler, and the coordinator writes each result once. When the scheduler goes away the
coordinator stops (:class:`ClusterLost`): what was written was written whole, the rest stays pending for the next
run.
"""

from __future__ import annotations

from capwatch.cluster.coordinator import (
    ClusterRun,
    WorkerStats,
    caption_on_cluster,
    cluster_state,
    connect,
    install,
    model_request,
)
from capwatch.cluster.messages import (
    FRAME_SUFFIX,
    BatchResult,
    ClusterError,
    ClusterLost,
    ModelRequest,
    SentFrames,
)
from capwatch.cluster.worker import (
    PROVIDERS_ENV,
    CaptionerPlugin,
    caption_batch,
    dask_setup,
    open_worker_captioner,
    parse_providers,
)

__all__ = [
    "FRAME_SUFFIX",
    "PROVIDERS_ENV",
    "BatchResult",
    "CaptionerPlugin",
    "ClusterError",
    "ClusterLost",
    "ClusterRun",
    "ModelRequest",
    "SentFrames",
    "WorkerStats",
    "caption_batch",
    "caption_on_cluster",
    "cluster_state",
    "connect",
    "dask_setup",
    "install",
    "model_request",
    "open_worker_captioner",
    "parse_providers",
]
