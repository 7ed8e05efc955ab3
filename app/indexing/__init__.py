"""The batch index-building job: source -> SQL rows -> DataLoader decode -> embed -> embedding shards -> index.

One module per step, each resumable after `kill -9` because each derives its work from durable state:

- sources.py: stream a folder (labels = sub-folder names, symlinked sub-folders followed) or a CSV manifest.
- register.py (step 1): hash each file, read its header, insert the rows not there yet (dedup by sha256).
- embed.py (step 2): embed live images with no stored embedding for the model into float16 shards under
  <data_dir>/embeddings/<model version>/; a file that fails to decode soft-deletes its row with the reason.
- publish.py (step 3): stored embeddings of live images -> a FAISS index (index.builders), written under a
  temporary name, renamed into <indexes_dir>/<version>, then inserted in SQL and promoted.
- verify.py: SQL and the active index agree.
- pipeline.py: the runs that chain the steps: build_index, merge_shards, rebuild_index.

Sharded runs (`shard=(i, n)`) take rows i, i+n, i+2n... of the source, register and embed them, and stop;
`merge_shards` then embeds whatever is still missing and publishes one index (FAISS's on-disk IVF merge for
IVF types when asked).
"""

from app.indexing.embed import embed_into_store, embed_missing
from app.indexing.pipeline import build_index, merge_shards, rebuild_index
from app.indexing.publish import prune_versions, publish_index
from app.indexing.register import register_source
from app.indexing.report import BuildReport, EmptySource, RayWorkersLost
from app.indexing.sources import SourceEntry, iter_source
from app.indexing.verify import VerifyReport, verify_index

__all__ = [
    "BuildReport", "EmptySource", "SourceEntry", "VerifyReport", "build_index",
    "embed_into_store", "embed_missing", "iter_source", "merge_shards", "prune_versions", "publish_index",
    "RayWorkersLost", "rebuild_index", "register_source", "verify_index",
]
