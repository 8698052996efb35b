"""Read SimpleTuner's config.json + multidatabackend.json, apply the key table, validate, report.

Every key read ends up in exactly one report entry: mapped (from -> to), dropped (flux_ray has its own
mechanism, or the value is what flux_ray does anyway) or not supported yet (with the reason). A mapped
value that flux_ray's spec refuses (e.g. an option another part of flux_ray refuses until it acts) is
moved to "not supported yet" with the spec's message, so the written spec always validates.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from flux_ray.simpletuner.table import (BACKENDS_UNSUPPORTED, DATASET_KINDS_DROPPED, DATASET_KINDS_UNSUPPORTED, Rule,
                                        rules_for)
from flux_ray.simpletuner.values import (AlreadyDefault, Context, Refused, Unsupported, WrongType, dataset_id,
                                         parquet_leftovers)
from flux_ray.spec import (DatasetSpec, JobSpec, SpecError, TrainSpec, check_local_inputs, is_secret_key,
                           load_spec)

MAPPED, DROPPED, UNSUPPORTED = "mapped", "dropped", "unsupported"
UNKNOWN = "no flux_ray equivalent yet (the importer does not know this key)"


@dataclass
class Entry:
    """One SimpleTuner key and what became of it."""
    file: str
    """The file as given (the report shows its name; errors the whole path)."""
    where: str
    """'' for config.json keys, 'datasets[i] <id>' for a dataset's."""
    key: str
    """As written (with its leading ``--`` if it had one)."""
    value: Any
    status: str
    target: str = ""
    """flux_ray dotted key (datasets addressed by id, as ``--set`` does)."""
    converted: Any = None
    note: str = ""
    path: tuple = ()
    """Where the value sits in the spec dict (removed again if the spec refuses it)."""

    def line(self) -> str:
        shown = "***" if is_secret_key(self.key) else _short(self.value)
        where = f"{Path(self.file).name}: {self.where + ': ' if self.where else ''}{self.key} = {shown}"
        if self.status == MAPPED:
            text = f"{where} -> {self.target} = {_short(self.converted)}"
            return text + (f"  ({self.note})" if self.note else "")
        return f"{where}: {self.note}"


@dataclass
class ImportResult:
    data: dict
    """The flux_ray job spec (only the keys the import set)."""
    entries: list[Entry]
    warnings: list[str] = field(default_factory=list)
    sources: str = ""

    def by_status(self, status: str) -> list[Entry]:
        return [e for e in self.entries if e.status == status]

    def to_yaml(self) -> str:
        head = f"# flux_ray job spec imported from SimpleTuner ({self.sources}); see the import report\n"
        return head + yaml.safe_dump(self.data, sort_keys=False, allow_unicode=True)

    def report(self) -> str:
        out = [f"SimpleTuner import: {self.sources}"]
        for status, title in ((MAPPED, "mapped (SimpleTuner -> flux_ray)"),
                              (DROPPED, "dropped (flux_ray has its own mechanism, or it is flux_ray's default)"),
                              (UNSUPPORTED, "not supported yet (dropped, with the reason)")):
            rows = self.by_status(status)
            out.append(f"{title}: {len(rows)}")
            out.extend("  " + e.line() for e in rows)
        out.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(out) + "\n"


def _short(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (dict, list)) else repr(v)
    return text if len(text) <= 120 else text[:117] + "..."


def read_json(path: Path, want: type, what: str) -> Any:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise SpecError(f"cannot read SimpleTuner {what} {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise SpecError(f"SimpleTuner {what} {path} is not valid JSON: {e}") from None
    if not isinstance(data, want):
        raise SpecError(f"SimpleTuner {what} {path}: expected a JSON {'object' if want is dict else 'list'} "
                        f"at the top level, got {type(data).__name__}")
    return data


def default_note(path: tuple) -> str:
    """'; flux_ray's default X applies' for a spec key (``datasets`` items addressed by index or not at all)."""
    keys = [p for p in path if isinstance(p, str) and p]
    if not keys:
        return ""
    if keys[0] == "datasets":
        field = DatasetSpec.model_fields.get(keys[-1])
    elif len(keys) == 1:
        field = JobSpec.model_fields.get(keys[0])
    else:
        field = JobSpec.model_fields[keys[0]].annotation.model_fields.get(keys[1])
    default = field.get_default(call_default_factory=True) if field else None
    return f"; flux_ray's default {default!r} applies" if field else ""


def _strip_dashes(config: dict, source: str) -> tuple[dict[str, Any], dict[str, str]]:
    """``--key`` and ``key`` are the same trainer argument; returns (values, key as written)."""
    values, written = {}, {}
    for raw, v in config.items():
        key = raw.lstrip("-")
        if key in values:
            raise SpecError(f"{source}: {written[key]} and {raw} set the same option; keep one")
        values[key], written[key] = v, raw
    return values, written


def _set(data: dict, path: tuple, value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node[part] if isinstance(node, list) else node.setdefault(part, {})
    node[path[-1]] = value


def _remove(data: dict, path: tuple) -> None:
    node = data
    for part in path[:-1]:
        node = node[part]
    node.pop(path[-1], None)


class _Importer:
    def __init__(self, config_path: Path, workdir: Path):
        self.config_file = str(config_path)
        self.workdir = workdir
        self.entries: list[Entry] = []
        self.data: dict[str, Any] = {}
        self.by_path: dict[tuple, Entry] = {}

    def apply(self, rule: Rule, value: Any, ctx: Context, entry: Entry, base: tuple) -> None:
        """Parse, convert and place one value; fills in the entry's status."""
        if value is None:
            entry.status, entry.note = DROPPED, "null: flux_ray's default applies"
            return
        if rule.action != "map":
            entry.status, entry.note = (DROPPED if rule.action == "drop" else UNSUPPORTED), rule.note
            return
        try:
            parsed = rule.parse(value, ctx)
            converted = rule.convert(parsed, ctx) if rule.convert else parsed
        except WrongType as e:
            raise SpecError(f"{entry.file}: {entry.where + ': ' if entry.where else ''}{entry.key}: {e} "
                            f"(got {value!r})") from None
        except Refused as e:
            raise SpecError(f"{entry.file}: {entry.key}: cannot be imported: {e}") from None
        except AlreadyDefault as e:
            entry.status, entry.note = DROPPED, str(e)
            return
        except Unsupported as e:
            entry.status, entry.note = UNSUPPORTED, str(e) + default_note(base + tuple(rule.target.split(".")))
            return
        path = base + tuple(rule.target.split("."))
        earlier = self.by_path.get(path)
        if earlier is not None:
            earlier.status, earlier.note = DROPPED, f"overridden by {entry.key}"
        _set(self.data, path, converted)
        self.by_path[path] = entry
        entry.status, entry.converted, entry.path = MAPPED, converted, path
        entry.note = rule.note if parsed != converted or rule.key != rule.target.split(".")[-1] else ""
        if rule.key == "parquet":
            left = parquet_leftovers(parsed)
            entry.note = f"not supported yet, dropped: {', '.join(left)}" if left else ""

    def config_keys(self, values: dict, written: dict, ctx: Context) -> dict[str, tuple[Any, str]]:
        """Apply the config.json rules; returns the dataset defaults config.json sets (key -> (value, written))."""
        rules, defaults = rules_for("config"), {}
        for key, rule in rules.items():  # table order: later rows override earlier ones on the same target
            if key not in values:
                continue
            if rule.scope != "config":
                defaults[key] = (values[key], written[key])
                continue
            entry = Entry(self.config_file, "", written[key], values[key], MAPPED, rule.target)
            self.entries.append(entry)
            self.apply(rule, values[key], ctx, entry, ())
        for key in values:
            if key not in rules:
                self.entries.append(Entry(self.config_file, "", written[key], values[key], UNSUPPORTED,
                                          note=UNKNOWN))
        return defaults

    def datasets(self, backend: list, backend_file: str, config: dict, defaults: dict) -> None:
        rules, used_defaults, out = rules_for("dataset"), set(), []
        for i, d in enumerate(backend):
            if not isinstance(d, dict):
                raise SpecError(f"{backend_file}: datasets[{i}]: expected a JSON object, got {d!r}")
            if "id" not in d:
                raise SpecError(f"{backend_file}: datasets[{i}]: id: a dataset needs an id")
            if not isinstance(d["id"], str) or not d["id"]:
                raise SpecError(f"{backend_file}: datasets[{i}].id: expected a non-empty string (got {d['id']!r})")
            where = f"datasets[{i}] {d['id']}"
            skip = self._dataset_skipped(d)
            if skip:
                status, reason = skip
                self.entries.extend(Entry(backend_file, where, k, v, status, note=reason) for k, v in d.items())
                continue
            ctx = Context(self.workdir, config, {**{k: v for k, (v, _) in defaults.items()}, **d})
            base, merged = ("datasets", len(out)), {}
            out.append({})
            self.data["datasets"] = out
            for key, (value, raw) in defaults.items():
                if key not in d:
                    merged[key] = (value, Entry(self.config_file, where, raw, value, MAPPED))
                    used_defaults.add(key)
            merged.update({k: (v, Entry(backend_file, where, k, v, MAPPED)) for k, v in d.items()})
            for key, rule in rules.items():
                if key in merged:
                    value, entry = merged[key]
                    entry.target = f"datasets.{dataset_key(d['id'])}.{rule.target}"
                    self.entries.append(entry)
                    self.apply(rule, value, ctx, entry, base)
            for key in d:
                if key not in rules:
                    self.entries.append(Entry(backend_file, where, key, d[key], UNSUPPORTED, note=UNKNOWN))
        if not out:
            raise SpecError(f"{backend_file}: no dataset flux_ray can train on (dataset_type: image, "
                            "type: local or aws)")
        for key, (value, raw) in defaults.items():
            if key not in used_defaults:
                self.entries.append(Entry(self.config_file, "", raw, value, DROPPED,
                                          note="every dataset sets its own"))

    @staticmethod
    def _dataset_skipped(d: dict) -> tuple[str, str] | None:
        kind, backend = d.get("dataset_type", "image"), d.get("type", "local")
        if kind in DATASET_KINDS_DROPPED:
            return DROPPED, f"dataset_type {kind}: {DATASET_KINDS_DROPPED[kind]}"
        if kind in DATASET_KINDS_UNSUPPORTED:
            return UNSUPPORTED, f"dataset_type {kind}: {DATASET_KINDS_UNSUPPORTED[kind]} (dataset dropped)"
        if backend in BACKENDS_UNSUPPORTED:
            return UNSUPPORTED, f"type {backend}: flux_ray reads local folders and S3 (dataset dropped)"
        return None


def dataset_key(raw_id: str) -> str:
    return dataset_id(raw_id, None)


def _blame(err: dict, entries: list[Entry]) -> tuple[Entry, str] | None:
    """The mapped entry a spec validation error is about: its exact location, or a mapped key under the error's
    location that the message names (first named wins). Dataset ids and backends are never blamed."""
    loc, msg = tuple(err["loc"]), err["msg"].removeprefix("Value error, ")
    mapped = [e for e in entries if e.status == MAPPED and e.path and e.path[-1] not in ("id", "type")]
    for e in mapped:
        if e.path == loc or loc[:len(e.path)] == e.path:  # the key itself, or a value inside it
            return e, msg
    named = []
    for e in mapped:
        if e.path[:len(loc)] != loc:
            continue
        dotted = ".".join(str(p) for p in e.path if not isinstance(p, int))
        for name in (dotted, e.path[-1]):
            at = msg.find(name)
            if at >= 0:
                named.append((at, -len(name), e))
                break
    return (min(named, key=lambda t: t[:2])[2], msg) if named else None


def _blame_text(message: str, entries: list[Entry]) -> list[tuple[Entry, str]]:
    """Mapped entries a refusal message names by full spec path (``datasets.0.x``, ``datasets.<id>.x``,
    ``train.x``): for refusals raised after the pydantic model (load_spec's own checks)."""
    out = []
    for e in entries:
        if e.status != MAPPED or not e.path or e.path[-1] in ("id", "type"):
            continue
        if ".".join(str(p) for p in e.path) in message or e.target in message:
            out.append((e, " ".join(message.split())))
    return out


def _spec_errors(data: dict, entries: list[Entry]) -> tuple[list[tuple[Entry, str]], list[str]]:
    """([(entry to blame, message)], [messages]) for the spec as it stands; both empty when it validates."""
    try:
        JobSpec.model_validate(copy.deepcopy(data))
    except ValidationError as e:
        errors = e.errors()
        blamed = [b for b in (_blame(err, entries) for err in errors) if b]
        return blamed, [f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: "
                        f"{err['msg'].removeprefix('Value error, ')}" for err in errors]
    try:
        load_spec(data=data, check_paths=False)
    except SpecError as e:
        return _blame_text(str(e), entries), [str(e)]
    return [], []


def validate_or_drop(importer: _Importer, sources: str) -> None:
    """Validate the spec; a mapped value the spec refuses becomes 'not supported yet' and is removed."""
    for _ in range(len(importer.entries) + 1):
        blamed, messages = _spec_errors(importer.data, importer.entries)
        if not messages:
            return
        if not blamed:
            raise SpecError(f"the spec imported from {sources} is invalid:\n  " + "\n  ".join(messages))
        for entry, msg in blamed:
            if entry.status == MAPPED:
                _remove(importer.data, entry.path)
                entry.status, entry.note = UNSUPPORTED, f"flux_ray's spec refuses it: {msg}{default_note(entry.path)}"


SECTION_ORDER = list(JobSpec.model_fields)


def import_simpletuner(config_path: str | Path, data_backend_config: str | Path | None = None,
                       user_prompt_library: str | Path | None = None,
                       working_dir: str | Path | None = None) -> ImportResult:
    """SimpleTuner files -> a validated flux_ray spec dict and the key-by-key report.

    Paths inside the files resolve against ``working_dir`` (SimpleTuner's working directory; default the
    config's parent's parent, as for ``config/config.json``); paths given here resolve against the caller's cwd.
    """
    config_path = Path(config_path)
    workdir = Path(working_dir).resolve() if working_dir else config_path.resolve().parent.parent
    values, written = _strip_dashes(read_json(config_path, dict, "config"), str(config_path))
    importer = _Importer(config_path, workdir)
    if user_prompt_library is not None:
        if "user_prompt_library" in values:
            importer.entries.append(Entry(str(config_path), "", written["user_prompt_library"],
                                          values["user_prompt_library"], DROPPED,
                                          note="overridden by --user-prompt-library"))
        values["user_prompt_library"] = str(Path(user_prompt_library).resolve())
        written["user_prompt_library"] = "--user-prompt-library (command line)"
    if data_backend_config is None:
        if not isinstance(values.get("data_backend_config"), str):
            raise SpecError(f"{config_path}: no data_backend_config key; pass --data-backend-config")
        backend_path = Path(values["data_backend_config"])
        backend_path = backend_path if backend_path.is_absolute() else workdir / backend_path
    else:
        backend_path = Path(data_backend_config)
    sources = f"{config_path} + {backend_path} (working dir {workdir})"
    ctx = Context(workdir, values)
    defaults = importer.config_keys(values, written, ctx)
    backend = read_json(backend_path, list, "data backend config")
    importer.datasets(backend, str(backend_path), values, defaults)
    validate_or_drop(importer, sources)
    data = {k: importer.data[k] for k in SECTION_ORDER if k in importer.data}
    result = ImportResult(data, importer.entries, sources=sources)
    result.warnings.append("scaling is not in SimpleTuner's files: the spec trains on 1 worker without a GPU "
                           "(flux_ray's defaults) until scaling.use_gpu / scaling.num_workers are set")
    if "max_train_steps" not in values:
        steps = TrainSpec.model_fields["max_train_steps"].default
        result.warnings.append(f"{config_path} sets no max_train_steps: flux_ray's default {steps} applies")
    spec = load_spec(data=data, check_paths=False)
    try:
        check_local_inputs(spec, "(imported)")
    except SpecError as e:
        result.warnings.append("flux-ray validate will refuse the spec on this machine until this is fixed: "
                               + " ".join(str(e).split()))
    return result
