"""What an index-building run did: filled in by each step, printed by the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field


class EmptySource(ValueError):
    """The source holds no image file: nothing to register, and nothing is published."""


class RayWorkersLost(RuntimeError):
    """A Ray build kept losing nodes or actors: the committed embedding shards stay, the same command resumes."""


@dataclass
class BuildReport:
    """What a run did. seen: image files the source listed; added: rows registered by this run (a file that
    then fails to decode is counted here and in `failed`); skipped_existing: files whose bytes were already
    registered; moved: registered images found under a new path (their row follows); updated: registered images
    whose label or metadata an edited manifest changed; revived: rows a build had
    retired whose bytes are back; replaced: rows retired because their file was overwritten; gone: paths of
    images whose file left the folder; pruned: those retired (--prune); failed: (path, reason); embedded: images
    embedded by this run; total_indexed: vectors in the active index afterwards; index_version_name: the version
    published, None when nothing changed or in shard mode; notes: lines the user should read (a setting
    that did not apply)."""

    seen: int = 0
    added: int = 0
    skipped_existing: int = 0
    moved: int = 0
    revived: int = 0
    replaced: int = 0
    updated: int = 0
    gone: list[str] = field(default_factory=list)
    pruned: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    embedded: int = 0
    total_indexed: int = 0
    images_per_second: float = 0.0
    index_version_name: str | None = None
    seconds: float = 0.0
    factory: str | None = None
    message: str = ""
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"added {counted(self.added, 'new image')}, {self.skipped_existing} already registered, "
            f"{len(self.failed)} failed, embedded {self.embedded} "
            f"({self.images_per_second:.1f} images/s), {self.seconds:.1f}s",
            self.message,
        ]
        if self.updated:
            lines.insert(1, f"{counted(self.updated, 'registered image')} given the label or metadata the manifest "
                            "now lists")
        if self.moved or self.replaced or self.revived:
            lines.insert(1, f"{self.moved} moved or renamed (their rows follow), {self.replaced} overwritten with "
                            f"other bytes (the old rows retired), {self.revived} retired before and back")
        if self.gone:
            shown = first_few(self.gone)
            lines.insert(1, f"retired {counted(self.pruned, 'image')} whose file left the folder: {shown}"
                         if self.pruned else
                         f"{counted(len(self.gone), 'image')} registered from this folder no longer there ({shown}): "
                         "searchable until a build with --prune retires them")
        lines += [f"note: {note}" for note in self.notes]
        lines += [f"  FAILED {path}: {reason}" for path, reason in self.failed]
        return "\n".join(line for line in lines if line)


def counted(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def first_few(paths: list[str], shown: int = 5) -> str:
    """The first paths of a list, and how many more: one line however long the list."""
    return ", ".join(paths[:shown]) + (f" and {len(paths) - shown} more" if len(paths) > shown else "")
