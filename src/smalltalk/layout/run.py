"""RunLayout: where each stage's artifact directory lies in a run, and the readers that decide the run's
state from them (how many experts, which are done, the mixture, the routing prefix)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from smalltalk.errors import SmalltalkError
from smalltalk.fsutil import read_json
from smalltalk.layout.artifacts import REPORT_PLOTS, RouterFiles, SFTFiles, TrainFiles, read_manifest


@dataclass(frozen=True)
class RunLayout:
    root: Path

    # -- stage directories ------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def routers(self) -> Path:
        return self.root / "routers"

    @property
    def routers_refined(self) -> Path:
        """The routers fine-tuned on the experts' own choices (refine.sequences > 0; experts/refine.py)."""
        return self.root / "routers-refined"

    @property
    def partition(self) -> Path:
        return self.root / "partition"

    @property
    def trunk(self) -> Path:
        """The shared trunk every expert branches from (experts.init=trunk; experts/start.py): a TrainFiles dir."""
        return self.root / "trunk"

    @property
    def experts_dir(self) -> Path:
        return self.root / "experts"

    def expert(self, index: int) -> Path:
        return self.experts_dir / f"{index:02d}"

    def expert_data(self, index: int) -> Path:
        """Expert `index`'s share as prepared data of its own (`smalltalk experts data`): all its job needs."""
        return self.root / "experts-data" / f"{index:02d}"

    def expert_model_rel(self, index: int) -> str:
        """Expert `index`'s model directory relative to the run (mixture.json stores relative paths)."""
        return str(TrainFiles(self.expert(index)).model.relative_to(self.root))

    def router_model_rel(self, name: str, routers: Path | None = None) -> str:
        """Router `name`'s model directory relative to the run, in `routers` (default RUN/routers)."""
        return str(RouterFiles(routers or self.routers).router(name).model.relative_to(self.root))

    def mixture_routers(self) -> Path:
        """The routers the mixture routes with: RUN/routers, or RUN/routers-refined after refinement."""
        return self.inside(self.mixture()["routers"], "'routers'") if self.has_mixture() else self.routers

    @property
    def dense(self) -> Path:
        return self.root / "dense"

    def dense_kind(self, kind: str) -> Path:
        return self.dense / kind

    @property
    def lm(self) -> Path:
        return self.root / "lm"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def eval_final(self) -> Path:
        """The test split's evaluation (`smalltalk eval --final`): run once, for the final table."""
        return self.root / "eval-final"

    @property
    def sft(self) -> SFTFiles:
        return SFTFiles(self.root / "sft")

    @staticmethod
    def results_file(eval_dir: Path) -> Path:
        return Path(eval_dir) / "results.json"

    @staticmethod
    def results_table(eval_dir: Path) -> Path:
        """The printed table of results.json (what `smalltalk eval` prints; an export's model card shows it)."""
        return Path(eval_dir) / "results.md"

    @property
    def report(self) -> Path:
        return self.root / "report"

    def plot(self, name: str) -> Path:
        """A report figure by its key in REPORT_PLOTS."""
        return self.report / REPORT_PLOTS[name]

    @property
    def report_md(self) -> Path:
        return self.report / "report.md"

    @property
    def report_html(self) -> Path:
        return self.report / "index.html"

    def added(self, pair: int) -> Path:
        """Prepared data of elastic pair `pair`."""
        return self.root / "added" / f"{pair:02d}" / "data"

    def pending_add(self, pair: int) -> Path:
        """An `experts add` under way (its inputs and their checksum); removed once mixture.json has the pair."""
        return self.root / "added" / f"{pair:02d}" / "pending.json"

    def pending_adds(self) -> list[dict]:
        found = sorted((self.root / "added").glob("*/pending.json")) if (self.root / "added").is_dir() else []
        return [read_json(path) for path in found]

    # -- run-level files -------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.root / "config.json"

    @property
    def stages_file(self) -> Path:
        return self.root / "stages.json"

    @property
    def mixture_file(self) -> Path:
        return self.root / "mixture.json"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    def job_record(self, expert: int) -> Path:
        return self.jobs / f"experts-{expert:02d}.json"

    def job_log(self, expert: int) -> Path:
        return self.jobs / f"experts-{expert:02d}.log"

    def dense_job_log(self, kind: str) -> Path:
        return self.jobs / f"dense-{kind}.log"

    def sbatch(self, stage: str) -> Path:
        return self.jobs / f"{stage}.sbatch"

    def sbatch_log(self, stage: str, array: bool) -> Path:
        return self.jobs / (f"{stage}-%a.log" if array else f"{stage}.log")

    # -- readers: each decision about the run's state is made here and nowhere else ---------------------
    def config(self) -> dict | None:
        return read_json(self.config_file) if self.config_file.is_file() else None

    def stages(self) -> dict:
        return read_json(self.stages_file) if self.stages_file.is_file() else {}

    def routers_manifest(self) -> dict:
        return read_manifest(self.routers, "run `smalltalk routers train` first")

    def partition_manifest(self) -> dict:
        return read_manifest(self.partition, "run `smalltalk partition` first")

    def num_experts(self) -> int:
        """E of the partition: how many expert jobs the run has (elastic pairs are counted by mixture.json)."""
        return self.partition_manifest()["experts"]

    def expert_done(self, index: int, steps: int | None = None) -> bool:
        return TrainFiles(self.expert(index)).done(steps)

    def expert_summaries(self) -> list[dict]:
        """The training summaries of the mixture's current experts (after any `experts add/remove`), or of
        the partition's experts before mixture.json exists."""
        if self.has_mixture():
            return [read_json(TrainFiles((self.root / rel).parent).manifest) for rel in self.mixture()["expert_dirs"]]
        return [read_json(TrainFiles(self.expert(k)).manifest) for k in range(self.num_experts())]

    def added_router_summaries(self) -> list[dict]:
        """Training summaries of routers that `experts add` trained (still in the mixture or not: their
        training was spent either way)."""
        mixture = self.mixture() if self.has_mixture() else {}
        pairs = [op["pair"] for op in mixture.get("elastic", []) if op["op"] == "add"]
        return [read_json(RouterFiles(self.routers).router(f"{k:02d}").manifest) for k in pairs]

    def dense_summary(self, kind: str) -> dict | None:
        return TrainFiles(self.dense_kind(kind)).summary()

    def has_mixture(self) -> bool:
        return self.mixture_file.is_file()

    def mixture(self) -> dict:
        """mixture.json, every path in it checked to stay inside the run (an absolute path or `..` in a
        directory someone handed over would have us load, export or delete what it names)."""
        if not self.has_mixture():
            raise SmalltalkError(f"no {self.mixture_file.name} in {self.root}",
                                 fix="train the experts first (`smalltalk run` or `smalltalk experts train --all`)")
        manifest = read_json(self.mixture_file)
        for key in ("tokenizer", "routers"):
            self.inside(manifest[key], f"{key!r}")
        for key in ("expert_dirs", "router_dirs"):
            for i, rel in enumerate(manifest.get(key, [])):
                self.inside(rel, f"{key}[{i}]")
        return manifest

    def inside(self, rel: str, what: str = "path") -> Path:
        """root/rel, refused (SmalltalkError) unless it is a relative path that resolves inside the run."""
        path = self.root / rel
        root = self.root.resolve()
        if Path(rel).is_absolute() or (path.resolve() != root and root not in path.resolve().parents):
            raise SmalltalkError(f"{what} {rel!r} in {self.mixture_file.name} leads outside the run {self.root}",
                                 where=str(self.mixture_file),
                                 fix="a mixture names its files relative to its own directory; re-export it")
        return path

    def is_run(self) -> bool:
        """Whether root holds a run: its stage record, prepared data or our config. A Hugging Face model's
        config.json (an export's, a checkpoint's) is not ours; one that is not JSON counts as a run (refused)."""
        if self.stages_file.is_file() or (self.data / "manifest.json").is_file():
            return True
        try:
            config = self.config()
        except (ValueError, SmalltalkError):
            return True
        return config is not None and not ("model_type" in config and "routing" not in config)

    def check_output(self, out: Path, what: str, allowed: tuple[Path, ...] = ()) -> None:
        """Refuse an output directory `out` that is this run, holds it, lies inside it (except at one of
        `allowed`), or is another run: writing there would replace artifacts a stage made."""
        target, source = Path(out).resolve(), self.root.resolve()
        inside = source in target.parents and target not in {Path(a).resolve() for a in allowed}
        if target == source or target in source.parents or inside or RunLayout(Path(out)).is_run():
            raise SmalltalkError(f"{what} {out} is a run directory, lies inside the run {self.root} or holds it: "
                                 "writing there would replace its artifacts",
                                 fix="choose a new directory outside the run" +
                                     (f" (or the default {allowed[0]})" if allowed else ""))

    def prefix(self) -> int:
        """M, the routing prefix: the mixture's once it exists (elastic edits keep it), else the routers'."""
        return self.mixture()["prefix"] if self.has_mixture() else self.routers_manifest()["prefix"]
