"""``locedit migrate RUN_DIR``: rewrite a run directory of an older run format into the current one.

Run format 1 (every run written before ``schema_version`` existed) differs from the current one
(:data:`locedit.plan.SCHEMA_VERSION`) in four places, and this module is the only code that knows them:

* ``config.json`` was the flat pydantic dump with a ``tracing`` section; a section written before the noise-scale
  rule existed has no ``noise_scale_rule`` and ran with ``"embedding"`` (σ = 3 × std(W_E)). It becomes the TOML
  layout with a ``localization`` section whose rule is explicit, and ``schema_version``.
* Journal keys: a noise grid was ``trace|FACT|KIND|wW`` (the other localizations had ``|LOCALIZATION``); an edit at
  the default token was ``edit|FACT|PROBLEM|METHOD|LN`` (the other rules had ``|TTOKEN``). Every key now names its
  localization, and every edit of a method with a key position its token (:mod:`locedit.plan`). Records are
  otherwise kept byte for byte; compressed journals stay compressed (gzip mtime 0), plain ones plain.
* ``provenance.json`` gains ``"plan"`` (:meth:`locedit.plan.StudyPlan.to_json`), built from what the run recorded:
  σ from its tracing records, the hyper-parameters it recorded per (problem, method), the config's layers and token
  rules; what the run did not record (the key-statistics tokens) is filled with the default of the time and listed
  under ``"migrated"`` → ``"assumed"``. Its old top-level ``hparams`` moves into the plan.
* The Parquet tables are rewritten from the migrated journals.

Migrating is idempotent (a current run is left alone) and byte-reproducible (two copies migrate to identical bytes);
it needs no model unless the run has no noise record to read σ from.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from locedit.config import StudyConfig, default_edit_layers, parse_config
from locedit.editors.covariance import DEFAULT_N_TOKENS
from locedit.editors.methods import EDIT_METHODS
from locedit.editors.tokens import DEFAULT_EDIT_TOKEN
from locedit.journal import json_default, scan_journal, write_gzip
from locedit.plan import SCHEMA_VERSION, StudyPlan, hparams_from_json, method_tokens, parse_key
from locedit.rundir import RunDir, StudyLockedError
from locedit.tracer.atomic import write_atomic
from locedit.tracer.corruption import GaussianNoise

__all__ = ["MigrationReport", "migrate_config", "migrate_key", "migrate_run_dir"]

_SECTIONS_V1 = ("data", "tracing", "editing", "hparams")


@dataclass(frozen=True)
class MigrationReport:
    run_dir: str
    from_version: int
    to_version: int
    keys_rewritten: int
    records: int
    sigma: float | None
    assumed: tuple[str, ...]

    def summary(self) -> str:
        if self.from_version == self.to_version:
            return f"{self.run_dir}: already run format {self.to_version}; nothing to do"
        return (f"{self.run_dir}: run format {self.from_version} -> {self.to_version}; {self.keys_rewritten} of "
                f"{self.records} journal keys rewritten; sigma {self.sigma:.4f} recorded in the plan"
                + (f"; assumed (not recorded by the run): {', '.join(self.assumed)}" if self.assumed else ""))


def migrate_config(old: dict[str, Any]) -> StudyConfig:
    """A format-1 ``config.json`` (flat, ``tracing`` section) as a current :class:`StudyConfig`."""
    study = {k: v for k, v in old.items() if k not in _SECTIONS_V1}
    loc = dict(old.get("tracing") or {})
    loc.setdefault("noise_scale_rule", "embedding")  # written before the rule existed: what it ran with
    raw = {"study": study, "localization": loc, **{k: old[k] for k in ("data", "editing", "hparams") if k in old}}
    return parse_config(raw)


def migrate_key(key: str) -> str:
    """A format-1 journal key in the current format (a current key is returned unchanged)."""
    parts = key.split("|")
    if parts[0] == "trace" and len(parts) == 4:
        key = f"{key}|noise"  # format 1 gave noise grids no localization suffix
    elif parts[0] == "edit" and len(parts) == 5 and EDIT_METHODS[parts[3]].uses_token:
        key = f"{key}|T{DEFAULT_EDIT_TOKEN}"  # format 1 gave the default token no suffix
    parse_key(key)  # the result is a key of the current format
    return key


def _rewrite_journal(path: Path) -> tuple[int, int, list[dict[str, Any]]]:
    """Rewrite one journal's keys in place (bad lines are kept as they are). ``(rewritten, records, records)``."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    lines = raw.split(b"\n")
    out, n_new, recs = [], 0, []
    good = {n for n, _ in enumerate(lines, 1)} - {n for n, _ in scan_journal(path)[1]}
    for n, line in enumerate(lines, 1):
        if n in good and line:
            rec = json.loads(line)
            new = migrate_key(rec["key"])
            if new != rec["key"]:
                n_new += 1
                rec = {**rec, "key": new}
                line = json.dumps(rec, default=json_default).encode()
            recs.append(rec)
        out.append(line)
    data = b"\n".join(out)
    if path.suffix == ".gz":
        write_gzip(path, data)
    else:
        write_atomic(path, data.decode())
    return n_new, len(recs), recs


def _sigma(tracing: list[dict[str, Any]]) -> float | None:
    sigmas = {float(r["sigma"]) for r in tracing if r.get("sigma") is not None}
    if len(sigmas) > 1:
        raise ValueError(f"the run's noise records hold several sigmas {sorted(sigmas)}: not one study")
    return sigmas.pop() if sigmas else None


def migrate_run_dir(run_dir: str | Path, model=None) -> MigrationReport:
    """Migrate ``run_dir`` to the current run format (see the module docstring). ``model``: only needed when the
    run has no noise record to read σ from (it is then resolved with the run's own rule)."""
    rd = RunDir(run_dir)
    if not rd.config_path.exists() or not rd.journal_dir.is_dir():
        raise ValueError(f"{rd.path} is not a locedit run directory (no config.json or no journal/ folder)")
    version = rd.schema_version()
    if version == SCHEMA_VERSION:
        return MigrationReport(str(rd.path), version, version, 0, 0, None, ())
    if version != 1:
        raise ValueError(f"{rd.path} has run format {version!r}; this locedit migrates format 1 only")
    locks = [((-1, -1), rd.exclusive())]
    try:
        for path in rd.journals():
            shard = rd.journal_shard(path)[1]
            if all(shard != s for s, _ in locks):
                locks.append((shard, rd.lock(shard)))
        if len(locks) == 1:
            locks.append(((0, 1), rd.lock()))
        config = migrate_config(rd.raw_config())
        prov = rd.provenance()
        n_new = n_rec = 0
        tracing: list[dict[str, Any]] = []
        for path in rd.journals():
            a, b, recs = _rewrite_journal(path)
            n_new, n_rec = n_new + a, n_rec + b
            if rd.journal_shard(path)[0] == "tracing":
                tracing += recs
        plan, assumed = _plan(rd, config, prov, tracing, model)
        # a format-1 run declared no [analysis]: writing today's defaults would make its analysis look pre-registered
        layout = {k: v for k, v in config.to_dict().items() if k != "analysis"}
        write_atomic(rd.config_path, json.dumps({"schema_version": SCHEMA_VERSION, **layout}, indent=2))
        prov = {k: v for k, v in prov.items() if k != "hparams"}
        prov["plan"] = plan.to_json()
        prov["migrated"] = {"from_schema": version, "assumed": list(assumed)}
        write_atomic(rd.provenance_path, json.dumps(prov, indent=2))
        rd.collect()
    except StudyLockedError as e:
        raise StudyLockedError(f"cannot migrate while a run holds the directory: {e}") from None
    finally:
        for _, lock in locks:
            lock.release()
    return MigrationReport(str(rd.path), version, SCHEMA_VERSION, n_new, n_rec, plan.noise.sigma, assumed)


def _plan(rd: RunDir, config: StudyConfig, prov: dict[str, Any], tracing: list[dict[str, Any]],
          model) -> tuple[StudyPlan, tuple[str, ...]]:
    """The plan a format-1 run ran with, from what it recorded."""
    assumed = []
    loc = config.localization
    sigma = loc.sigma if loc.sigma is not None else _sigma(tracing)
    if sigma is None:
        if model is None:
            raise ValueError(f"{rd.path} has no noise record to read sigma from: migrate it with the model loaded "
                             "(locedit.migrate.migrate_run_dir(run_dir, model=load_model(...)))")
        sigma = loc.corruption().resolve(model).sigma
    noise = GaussianNoise(scale=None if loc.sigma is not None else loc.noise, sigma=sigma, samples=loc.samples,
                          seed=loc.seed, rule=loc.noise_scale_rule)
    pm = prov.get("model", {})
    n_layers = int(pm.get("n_layers") or (model.cfg.n_layers if model is not None else 0))
    if not n_layers:
        raise ValueError(f"{rd.path}/provenance.json records no model depth")
    hp = prov.get("hparams", {})
    wanted = [f"{p}|{m}" for p in config.editing.problems for m in config.editing.methods]
    missing = [k for k in wanted if k not in hp]
    if missing:
        raise ValueError(f"{rd.path}/provenance.json records no hyper-parameters for {missing}")
    n_cov = config.editing.covariance_tokens
    if n_cov is None:
        n_cov = DEFAULT_N_TOKENS
        assumed.append(f"covariance_tokens={DEFAULT_N_TOKENS} (the default; a run under "
                       "$LOCEDIT_COVARIANCE_TOKENS used that value)")
    hparams = {(p, m): hparams_from_json(EDIT_METHODS[m].hparams, hp[f"{p}|{m}"])
               for p in config.editing.problems for m in config.editing.methods}
    layers = tuple(config.editing.layers or default_edit_layers(n_layers, config.model))
    if config.editing.layers is None:  # the default depends on the profile at the time (e.g. a later layer sweep)
        assumed.append(f"layers={list(layers)} (today's default edit layers for the model; the run recorded none)")
    plan = StudyPlan(config, pm.get("name", config.model), n_layers, noise, layers, hparams, method_tokens(config),
                     int(n_cov), tuple(rd.fact_ids() or []))
    return plan, tuple(assumed)
