"""Execution plan entries and the contract check that runs before any stage does.

A :class:`StageEntry` is pure data (no reference to the stage object): it says where the
stage lives on its pipeline (``attr``/``key``), what to call on it, and how fields map between
the state and the stage. Keeping entries free of object references makes pipelines safe to
deep-copy and pickle, which DSPy optimizers do constantly.

:class:`Scope` is the contract checker: patterns walk their stages through it in every
possible path (each branch, a loop's first iteration) and it raises :class:`ContractError`
for a field that is not available, or collects the pipeline's own external inputs.
"""

from __future__ import annotations

import contextlib
import difflib
import types
import typing
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import dspy

from stageflow.engine.protocol import StageOwner
from stageflow.errors import ContractError, StageflowError
from stageflow.stages import (
    RESERVED_FIELD_NAMES,
    DeferredField,
    FunctionStage,
    Ports,
    Stage,
    describe,
    function_stage_in,
    left_to_engine,
    may_be_left_out,
    own_call_code,
    stage_label,
    wraps_function,
)

__all__ = [
    "Scope",
    "StageEntry",
    "build_entry",
    "held",
    "join_path",
    "leaf_of",
    "signature_fields",
    "signature_moved",
    "signature_of",
    "signature_replaced",
]

MODULE = 0
FUNCTION = 1


def join_path(prefix: str, path: str) -> str:
    """Join an enclosing path and a local one the way DSPy names parameters."""
    if not prefix:
        return path
    if not path:
        return prefix
    return f"{prefix}.{path}"


@dataclass(frozen=True, slots=True)
class StageEntry:
    """How a pipeline calls one of its stages (pure data; see module docstring)."""

    path: str
    attr: str
    key: int | str | None
    chain: tuple[str, ...]
    kind: int
    is_async_fn: bool
    has_aforward: bool
    in_pairs: tuple[tuple[str, str], ...]
    opt_pairs: tuple[tuple[str, str], ...]
    out_pairs: tuple[tuple[str, str], ...] | None
    out_rename: tuple[tuple[str, str], ...]
    single_output: str | None
    pass_state: bool
    ports: Ports
    label: str
    composite: bool = False
    merge_skip: frozenset[str] = frozenset()
    policy: Any = None
    blocking: bool = False
    merge_all: bool = False
    predictor: bool = False
    #: A module with its own ``aforward`` that is not a predictor (predictors may take the fast path).
    direct_acall: bool = False
    #: Its inputs are exactly ``in_pairs`` (no optional ones, not the whole state, not a nested
    #: pipeline asked for its ports at run time): the engine picks them itself.
    plain_inputs: bool = False
    #: Called as ``target(**inputs)`` when no concurrency budget is in force (not a predictor, which
    #: may take the fast path, nor an ``async def`` function, nor a nested pipeline).
    plain_call: bool = False
    #: A leaf ``dspy.Module`` of yours (not a predictor, nested pipeline, lazy or function stage): the
    #: engine calls it through :mod:`stageflow.engine.module_call` (``Module.__call__``'s steps).
    module_call: bool = False
    #: A predictor's signature when the plan was made (:func:`signature_of`; ``dspy.Predict``,
    #: ``ChainOfThought`` and their subclasses): one replaced in place with other fields makes the
    #: plan stale (see ``Pipeline.stageflow_current``).
    signature: Any = None
    #: Its inputs' annotations are the parameters of a function it runs (a function stage, or a
    #: ``Stage`` subclass of yours around one): the list-vs-str check applies to them.
    typed_inputs: bool = False
    #: A lazy stage (``LazyStage``): the engine forces its result as part of the call, so the
    #: stage's policies and error handling cover the work it defers.
    lazy: bool = False
    #: The engine calls a ``Stage`` object itself (a subclass of yours, a ``Stage`` around a
    #: ``Stage``): while it runs, the checks that stage makes of its outputs on its own are left
    #: to the engine's merge (``stages.ENGINE_CALLS``).
    stage_leaf: bool = False
    #: Called as it is: not a nested pipeline, not a ``Stage`` the engine calls itself (the common
    #: leaf, whose context is only its path: see ``runner.call_stage``).
    bare_leaf: bool = False
    #: Its returned record merges whole, unrenamed: no declared or renamed outputs, not a nested
    #: pipeline (a ``dspy.Prediction`` is merged in one step: see ``boundary.merge_outputs``).
    merge_whole: bool = False
    #: A function stage with a single output (the ``FunctionStage``): a ``None`` it returns is
    #: checked against its function (``stageflow._returns.none_is_wrong``: a forgotten ``return``
    #: is not an output).
    function_stage: Any = None


def leaf_of(owner: Any, entry: StageEntry) -> Any:
    """The object the engine calls for ``entry``: the held stage, unwrapped along ``entry.chain``."""
    obj = held(owner, entry)
    for name in entry.chain:
        obj = object.__getattribute__(obj, name)
    return obj


def signature_replaced(owner: Any, entry: StageEntry) -> bool:
    """Whether the predictor of ``entry`` holds another signature object than the one its plan was
    made with (maybe with the same fields). The check the engine makes before every predictor stage
    and every call, so the common case (the same object, a plain ``dspy.Predict``) is written out:
    ``signature_of(leaf_of(owner, entry)) is not entry.signature``."""
    obj = object.__getattribute__(owner, entry.attr)
    if entry.key is not None:
        obj = obj[entry.key]
    for name in entry.chain:
        obj = object.__getattribute__(obj, name)
    if type(obj) is dspy.Predict:
        return object.__getattribute__(obj, "__dict__").get("signature") is not entry.signature
    return signature_of(obj) is not entry.signature


def signature_moved(owner: Any, entry: StageEntry) -> bool:
    """Whether the predictor of ``entry`` now has a signature with other fields than the one its
    plan was made with (replaced in place: ``pred.signature = pred.signature.prepend(...)``)."""
    now = signature_of(leaf_of(owner, entry))
    if now is entry.signature:
        return False
    if now is None:  # (no predictor there any more: a function or a module put in its place)
        return True
    return (
        signature_fields(now) != signature_fields(entry.signature)
        or _types(now) != _types(entry.signature)
        or _left_out(now) != _left_out(entry.signature)
    )


def _types(signature: Any) -> tuple[Any, ...]:
    """The annotations of a signature's fields, in order (a field's type changed in place, as in
    ``answer: str`` -> ``answer: list[str]``, changes what the contract check says)."""
    return tuple(field.annotation for field in signature.model_fields.values())


def _left_out(signature: Any) -> tuple[str, ...]:
    """The inputs of a signature that DSPy runs without (optional in the contract): a default added
    or removed in place changes what the contract check says."""
    return tuple(name for name, f in signature.input_fields.items() if may_be_left_out(f))


def _callbacks_descriptor(cls: type) -> bool:
    """Whether a module class reads ``callbacks`` through a data descriptor of its own (a property
    with a setter): what it returns may differ from the list its setter keeps in the instance, which
    is all the engine's call can read cheaply, so DSPy's own call (which reads the property) runs."""
    for klass in cls.__mro__:
        if "callbacks" in klass.__dict__:
            return hasattr(type(klass.__dict__["callbacks"]), "__set__")
    return False


def _signed(leaf: Any) -> Any:
    """The ``dspy.Predict`` / ``ChainOfThought`` whose signature decides ``leaf``'s ports: ``leaf``
    itself, or the stage a wrapper reads its ports from live (``stageflow_live_ports_of``:
    ``LazyStage``), else ``None``."""
    follow = getattr(type(leaf), "stageflow_live_ports_of", None)
    if follow is not None:
        leaf = object.__getattribute__(leaf, "__dict__").get(follow)
    return leaf if isinstance(leaf, dspy.Predict | dspy.ChainOfThought) else None


def _attrs(obj: Any) -> dict[str, Any]:
    """``obj.__dict__`` read without DSPy's attribute hook; empty for an object without one."""
    try:
        found = object.__getattribute__(obj, "__dict__")
    except AttributeError:  # (None, a builtin, a __slots__ object)
        return {}
    return found if isinstance(found, dict) else {}


def signature_of(leaf: Any) -> Any:
    """The signature a ``dspy.Predict`` runs with now (a ``ChainOfThought``'s: its predictor's; a
    ``LazyStage``'s: its stage's), read without DSPy's attribute hook."""
    follow = getattr(type(leaf), "stageflow_live_ports_of", None)
    if follow is not None:
        leaf = _attrs(leaf).get(follow)
    attrs = _attrs(leaf)
    inner = attrs.get("predict")
    if inner is not None and type(leaf) is not dspy.Predict:
        leaf, attrs = inner, _attrs(inner)
    found = attrs.get("signature")
    if found is None and isinstance(getattr(type(leaf), "signature", None), property):
        found = getattr(leaf, "signature", None)  # (a subclass keeps it behind a property)
    return found


_FIELDS: weakref.WeakKeyDictionary[Any, tuple[tuple[str, ...], tuple[str, ...]]] = weakref.WeakKeyDictionary()


def signature_fields(signature: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A signature's input and output field names (remembered per signature class).

    >>> signature_fields(dspy.Signature("context, question -> answer"))
    (('context', 'question'), ('answer',))
    """
    try:
        return _FIELDS[signature]
    except (KeyError, TypeError):
        pass
    found = (tuple(signature.input_fields), tuple(signature.output_fields))
    with contextlib.suppress(TypeError):  # (not weakly referable: not remembered)
        _FIELDS[signature] = found
    return found


def held(owner: Any, entry: StageEntry) -> Any:
    """The stage object as ``owner`` holds it (a module, Stage wrapper or FunctionStage)."""
    obj = object.__getattribute__(owner, entry.attr)
    if entry.key is not None:
        obj = obj[entry.key]
    return obj


def _local_path(attr: str, key: int | str | None) -> str:
    if key is None:
        return attr
    if isinstance(key, int):
        return f"{attr}[{key}]"
    return f"{attr}['{key}']"


def _library_call(cls: type) -> bool:
    """Whether a ``Stage`` class's call methods are all stageflow's or DSPy's own (``Stage``,
    ``CachedStage``, ``dspy.Module``): the engine may then call the wrapped module itself."""
    return not own_call_code(cls)


def build_entry(attr: str, key: int | str | None, obj: Any) -> StageEntry:
    """Describe how to call ``obj`` held at ``pipeline.<attr>[key]``.

    A single :class:`Stage` wrapper is unwrapped: the engine calls the wrapped module once
    (through its ``__call__``, so DSPy records traces) and does the renaming itself, instead of
    stacking another ``dspy.Module.__call__`` layer. Plain functions are called directly.
    """
    chain: tuple[str, ...] = ()
    in_map: dict[str, str] = {}
    out_map: dict[str, str] = {}
    leaf = obj
    policy = getattr(obj, "policy", None) if isinstance(obj, Stage) else None
    declared = False
    if isinstance(obj, Stage) and not _library_call(type(obj)):
        # A subclass of yours with its own forward / aforward / __call__ / acall: called as a module,
        # so that code runs (it renames through Stage.forward when it calls super()). The policies the
        # class applies in its own forward (``stageflow_applies``: CachedStage's cache) are not
        # applied around it a second time.
        leaf = obj
        leaf_ports = describe(obj)
    elif isinstance(obj, Stage) and not isinstance(obj.module, Stage):
        obj.refresh_ports()  # (its predictor's signature may have been replaced in place)
        leaf = obj.module
        leaf_ports = obj.inner_ports
        in_map, out_map = obj.input_map, obj.output_map
        chain = ("module",)
        declared = obj.declares_outputs
    else:
        try:
            leaf_ports = describe(obj)
        except ContractError as e:
            if e.stage_path is None and e.code == "item_not_read":  # (a ForEach held here: say where)
                where = _local_path(attr, key)
                e.with_path_prefix(where)
                e.message = f"At '{where}': {e.message}"
                e.args = (e.message,)
            raise
    if leaf is obj and isinstance(obj, Stage):
        # (a Stage called as a module, e.g. a CachedStage around a Stage: its own forward applies
        # its class's share of the policies)
        policy = left_to_engine(type(obj), policy)
    kind = MODULE
    is_async_fn = False
    if isinstance(leaf, FunctionStage):
        chain = (*chain, "fn")
        kind = FUNCTION
        is_async_fn = leaf.is_async
    extra = tuple(k for k in in_map if k not in leaf_ports.required and k not in leaf_ports.optional)
    in_pairs = tuple((f, in_map.get(f, f)) for f in (*leaf_ports.required, *extra))
    opt_pairs = tuple((f, in_map.get(f, f)) for f in leaf_ports.optional)
    out_pairs = None
    if leaf_ports.outputs is not None:
        out_pairs = tuple((f, out_map.get(f, f)) for f in leaf_ports.outputs)
    # (a Stage subclass of yours around a function stage: its forward returns what the function does)
    runs_function = kind == FUNCTION or (leaf is obj and wraps_function(obj))
    single = out_pairs[0][1] if runs_function and out_pairs is not None and len(out_pairs) == 1 else None
    composite = isinstance(leaf, StageOwner)
    lazy = getattr(type(leaf), "stageflow_lazy", False) is True
    predictor = type(leaf) in (dspy.Predict, dspy.ChainOfThought)
    error_field = getattr(leaf, "stageflow_error_field", None)
    if error_field and not composite:
        # The stage reports failures in a field (StandardStage's ``error``): such a result is a failure.
        from stageflow.policies.recovery import StagePolicy

        policy = (
            StagePolicy(error_field=error_field)
            if policy is None
            else replace(policy, error_field=policy.error_field or error_field)
        )
    # A nested pipeline's whole final state merges back, unless its outputs were declared or
    # renamed at the boundary (then only those do, as the contract check promised).
    merge_all = composite and not declared and not out_map
    return StageEntry(
        path=_local_path(attr, key),
        attr=attr,
        key=key,
        chain=chain,
        kind=kind,
        is_async_fn=is_async_fn,
        has_aforward=hasattr(leaf, "aforward"),
        in_pairs=in_pairs,
        opt_pairs=opt_pairs,
        out_pairs=out_pairs,
        out_rename=tuple(out_map.items()),
        single_output=single,
        typed_inputs=runs_function,
        pass_state=leaf_ports.accepts_any and not in_pairs and not opt_pairs,
        ports=describe(obj),
        label=stage_label(obj),
        composite=composite,
        # A nested pipeline's result repeats its inputs; those it got under another name must not
        # overwrite the state field of that name.
        merge_skip=frozenset(sf for sf, st in (*in_pairs, *opt_pairs) if sf != st)
        - frozenset(leaf_ports.outputs or ()),
        policy=policy,
        blocking=bool(getattr(leaf, "blocking", False)),
        merge_all=merge_all,
        # A Predict / ChainOfThought: called through the fast path when it is on.
        predictor=predictor,
        signature=signature_of(leaf) if _signed(leaf) is not None else None,
        direct_acall=hasattr(leaf, "aforward") and not predictor and kind != FUNCTION and not lazy,
        plain_inputs=not opt_pairs
        and not (leaf_ports.accepts_any and not in_pairs)
        and not (composite and not chain),
        plain_call=not (predictor or is_async_fn or composite or lazy),
        module_call=isinstance(leaf, dspy.Module)
        and kind != FUNCTION
        and not (predictor or composite or lazy)
        and not _callbacks_descriptor(type(leaf)),
        lazy=lazy,
        stage_leaf=isinstance(leaf, Stage),
        bare_leaf=not composite and not isinstance(leaf, Stage),
        merge_whole=out_pairs is None and not out_map and not merge_all,
        function_stage=function_stage_in(leaf) if single is not None else None,
    )


def _is_list_type(t: Any) -> bool:
    origin = typing.get_origin(t) or t
    return origin in (list, tuple, set, frozenset)


def _merged(f: str, paths: list[Scope]) -> tuple[Any, str]:
    """The type and origin of field ``f`` after branches ``paths`` that all produce it: the type
    the paths that declare one agree on, else the union of theirs (``None``: none declares one, or
    the types cannot form a union). The origin is a path that may produce a list, when one does, so
    a later stage taking ``f`` as a single ``str`` is refused naming it (see :func:`_may_be_list`)."""
    known: list[Any] = []
    origin = paths[0].origin.get(f, "")
    listed = False
    for s in paths:
        t = s.available.get(f)
        if t is None:
            continue
        if not listed and _may_be_list(t):
            origin, listed = s.origin.get(f, ""), True
        if not any(t == k for k in known):
            known.append(t)
    if not known:
        return None, origin
    if len(known) == 1:
        return known[0], origin
    try:
        return typing.Union[tuple(known)], origin  # noqa: UP007
    except TypeError:  # (an annotation that cannot be hashed: no union of it)
        return None, origin


def _may_be_list(t: Any) -> bool:
    """Whether a value of annotation ``t`` may be a list (or tuple, set): ``list[str]``, or a union
    with one among its members (``list[str] | None``, the union of branches' types)."""
    if _is_list_type(t):
        return True
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return any(_may_be_list(a) for a in typing.get_args(t))
    return False


@dataclass
class Scope:
    """Fields available at a point of a pipeline, for the contract check.

    Args:
        available: field -> annotation (``None`` when unknown).
        origin: field -> the stage path that produced it (``"input"`` for pipeline inputs).
        strict: raise on a missing field (a real call) or collect it (computing a pipeline's
            own inputs, when it is used as a stage).
        closed: strict contracts: a field that only a stage with undeclared outputs may produce is
            an error too, instead of being checked at run time.

    A field a stage needs that no path can produce is a :class:`ContractError` (or, when collecting,
    an input of the pipeline). A field that an upstream stage with undeclared outputs *might* produce
    is **deferred**: recorded in ``deferred`` and checked at the boundary of the stage that reads it,
    at run time, just before that stage runs.
    """

    available: dict[str, Any]
    origin: dict[str, str]
    strict: bool
    missing: dict[str, str] = field(default_factory=dict)
    optional: dict[str, str] = field(default_factory=dict)
    opaque: list[str] = field(default_factory=list)
    partial: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)
    owner: Any = None
    closed: bool = False
    deferred: list[DeferredField] = field(default_factory=list)
    #: field -> the first fix to offer when it is missing (a pattern knows better than the generic
    #: hint: a ForEach names its ``item=``); shared by copies, like ``missing``.
    hints: dict[str, str] = field(default_factory=dict)
    #: The predictors checked, as ``(owner, entry, full path)``, nested ones included; shared by copies.
    watched: list[tuple[Any, StageEntry, str]] = field(default_factory=list)
    #: field -> the annotation a stage reading it declares, for fields still missing when collecting a
    #: pipeline's own inputs: its ports carry it, so the enclosing pipeline checks what it passes in.
    #: Shared by copies, like ``missing``.
    wants: dict[str, Any] = field(default_factory=dict)
    #: Set (one ``True``) when a stage that takes the whole state (``**kwargs`` and nothing named) is
    #: checked: a pipeline holding one takes the whole state of its caller too. Shared by copies.
    takes_state: list[bool] = field(default_factory=list)

    @classmethod
    def start(cls, inputs: Any, *, strict: bool, owner: Any = None, closed: bool = False) -> Scope:
        names = list(inputs)
        return cls(dict.fromkeys(names), dict.fromkeys(names, "input"), strict, owner=owner, closed=closed)

    def copy(self) -> Scope:
        return Scope(
            dict(self.available),
            dict(self.origin),
            self.strict,
            self.missing,
            self.optional,
            list(self.opaque),
            dict(self.partial),
            self.owner,
            self.closed,
            self.deferred,
            self.hints,
            self.watched,
            self.wants,
            self.takes_state,
        )

    def narrow(self, paths: list[Scope], labels: list[str]) -> None:
        """Keep only the fields available on every one of ``paths`` (branches of this point).

        Fields produced on some paths only are remembered, so an error about them can say which
        path lacks them.
        """
        common = set.intersection(*(set(s.available) for s in paths))
        everything = set().union(*(set(s.available) for s in paths))
        for f in sorted(everything - common):
            have = tuple(lab for lab, s in zip(labels, paths, strict=True) if f in s.available)
            lack = tuple(lab for lab, s in zip(labels, paths, strict=True) if f not in s.available)
            self.partial[f] = (have, lack)
        for s in paths:
            self.opaque.extend(p for p in s.opaque if p not in self.opaque)
            for k, v in s.partial.items():
                self.partial.setdefault(k, v)
        self.available, self.origin = {}, {}
        for f in common:
            self.available[f], self.origin[f] = _merged(f, paths)

    def need(self, f: str, path: str, error: Any) -> bool:
        """Require field ``f`` at ``path``: ``True`` when it is available (or deferred to run time).

        ``error()`` builds the :class:`ContractError` raised when ``f`` cannot be there. When
        collecting a pipeline's own inputs, a missing field becomes one (``False`` is returned).
        """
        if f in self.available:
            return True
        if self.opaque and not self.closed:
            # An upstream stage with undeclared outputs may produce it: check it at run time. It is
            # also offered to the stage when the caller has it (an optional input when collecting).
            self.deferred.append(DeferredField(path, f, tuple(self.opaque)))
            if not self.strict:
                self.optional.setdefault(f, path)
            self.available[f] = None
            self.origin[f] = "deferred"
            return True
        if self.strict:
            raise error()
        self.missing.setdefault(f, path)
        return False

    def check(self, entry: StageEntry, prefix: str) -> StageEntry:
        """Check one stage's inputs, then make its outputs available; returns the entry checked (a
        predictor's entry in its owner's re-made plan when its signature was replaced in place)."""
        ports = entry.ports
        lenient = False
        if entry.composite and self.owner is not None:
            nested = held(self.owner, entry)
            try:
                ports = describe(nested)  # live: a nested pipeline may have grown
            except StageflowError as e:  # (its re-made plan's error names its own stages)
                raise e.with_path_prefix(join_path(prefix, entry.path)) from e.__cause__
            # A nested pipeline that turned strict contracts off itself checks its reads at run time.
            lenient = getattr(nested, "strict", None) is False
        path = join_path(prefix, entry.path)
        if (entry.pass_state or (entry.composite and ports.accepts_any)) and not self.takes_state:
            self.takes_state.append(True)
        if ports.watched:
            self.watched.extend((o, e, join_path(path, p)) for o, e, p in ports.watched)
        elif entry.signature is not None and self.owner is not None:
            entry = self.owner.stageflow_current(entry, prefix)  # (its signature replaced since the plan)
            ports = entry.ports
            self.watched.append((self.owner, entry, path))
        for f in ports.required:
            if f in self.available:
                self._check_type(entry, ports, path, f)
                continue
            if not self.strict and not (self.opaque and not self.closed):
                inner = ports.required_by.get(f)
                self.missing.setdefault(f, join_path(path, inner) if inner else path)
                self._want(entry, ports, f)
                continue
            self.need(f, path, lambda f=f: self._missing_error(entry, path, f, ports))
        for f in ports.optional:
            if f in self.available:
                self._check_type(entry, ports, path, f)
            else:
                self.optional.setdefault(f, path)
                self._want(entry, ports, f)
        self.produce(ports, path, entry.label, lenient=lenient)
        return entry

    def produce(self, ports: Ports, path: str, label: str, *, lenient: bool = False) -> None:
        """Make ``ports.outputs`` available (or note that this stage's outputs are unknown).
        ``lenient``: the stage's own reads checked at run time are accepted under strict contracts
        (a nested pipeline with ``strict=False``)."""
        for f, (have, lack) in ports.partial.items():
            if f not in self.available:
                self.partial[f] = (
                    tuple(join_path(path, h) for h in have),
                    tuple(join_path(path, x) for x in lack),
                )
        for d in ports.deferred:
            if self.closed and not lenient:
                raise _strict_error(replace(d, stage=join_path(path, d.stage)), path)
            self.deferred.append(
                replace(
                    d,
                    stage=join_path(path, d.stage),
                    candidates=tuple(join_path(path, c) for c in d.candidates),
                )
            )
        if ports.outputs is None:
            self.opaque.append(path)
            return
        self.opaque.extend(join_path(path, p) for p in ports.opaque)
        for o in ports.outputs:
            if o in RESERVED_FIELD_NAMES:
                raise ContractError(
                    f"Stage '{path}' ({label}) writes the field '{o}', which collides with a "
                    f"dspy.Prediction attribute, so result.{o} would not return it.",
                    stage_path=path,
                    field=o,
                    code="reserved_field",
                    hint=f"rename it at the boundary: Stage(<stage>, outputs={{'{o}': '{o}_value'}})",
                )
            # (a field the stage also reads: its annotation there is the input's, not what it writes)
            reads = o in ports.required or o in ports.optional
            self.available[o] = None if reads else ports.types.get(o)
            self.origin[o] = path

    def _want(self, entry: StageEntry, ports: Ports, f: str) -> None:
        """Note the annotation ``entry`` declares for the input ``f`` the pipeline must be given."""
        if entry.typed_inputs or entry.kind == 1 or entry.composite:
            want = ports.types.get(f)
            if want is str:  # (the reader the check is about wins over an earlier one taking a list)
                self.wants[f] = want
            elif want is not None:
                self.wants.setdefault(f, want)

    def _check_type(self, entry: StageEntry, ports: Ports, path: str, f: str) -> None:
        """Refuse a field that may be a list for a stage taking it as a single ``str`` (a function
        stage, or a nested pipeline one of whose stages does, see :attr:`wants`)."""
        if not (entry.typed_inputs or entry.kind == 1 or entry.composite):
            return
        have, want = self.available.get(f), ports.types.get(f)
        if have is None or want is None:
            return
        if want is str and _may_be_list(have):
            certain = _is_list_type(have)
            raise ContractError(
                f"Stage '{path}' ({entry.label}) takes '{f}' as a single str, but '{self.origin.get(f)}' "
                + (
                    f"produces a list ({have})." if certain else f"may produce a list ({have}: on some path)."
                ),
                stage_path=path,
                field=f,
                code="list_vs_scalar",
                hint=(
                    f"run the stage once per item with ForEach(<stage>, over='{f}', ...), or annotate the "
                    f"parameter as list[str]"
                    if certain
                    else f"make every path produce a single str for '{f}', or annotate the parameter "
                    f"as {have}"
                ),
            )

    def _missing_error(self, entry: StageEntry, path: str, f: str, ports: Ports) -> ContractError:
        """The error for input ``f`` of ``entry`` missing at ``path``; ``ports`` are the stage's ports
        as they are now (a nested pipeline may have changed since its entry was built)."""
        avail = sorted(self.available)
        inputs = sorted(k for k, v in self.origin.items() if v == "input")
        produced = {k: v for k, v in self.origin.items() if v != "input"}
        inner = ports.required_by.get(f)
        needed_by = f" (for its stage '{join_path(path, inner)}')" if inner else ""
        where = f"pipeline inputs: {inputs}"
        if produced:
            where += "; " + ", ".join(f"'{k}' from '{v}'" for k, v in produced.items())
        close = difflib.get_close_matches(f, avail, n=1, cutoff=0.5)
        source = close[0] if close else (avail[0] if avail else "some_field")
        fixes = [f"pass {f}=... when calling the pipeline", f"produce '{f}' in a stage before '{path}'"]
        if f in ports.hints:
            fixes.insert(0, ports.hints[f])
        if avail:
            # The stage's own parameter reading `f` (it differs when the stage renames its inputs).
            param = next((p for p, sf in (*entry.in_pairs, *entry.opt_pairs) if sf == f), f)
            if param != f:
                fixes.append(
                    f"feed its parameter '{param}' from an existing field: change its "
                    f"inputs={{'{param}': '{f}'}} to inputs={{'{param}': '{source}'}}"
                )
            else:
                fixes.append(f"feed it from an existing field: Stage(<stage>, inputs={{'{f}': '{source}'}})")
        partial = ""
        if f in self.partial:
            have, lack = self.partial[f]
            partial = (
                f" '{f}' is produced only on some paths: by {', '.join(repr(h) for h in have)}, "
                f"not by {', '.join(repr(x) for x in lack)}."
            )
        opaque = ""
        if self.opaque:
            opaque = (
                f" Strict contracts are on, and stages {self.opaque} have undeclared outputs; if one of them "
                f"produces '{f}', declare it with Stage(<stage>, writes=['{f}'])."
            )
        return ContractError(
            f"Stage '{path}' ({entry.label}) needs input '{f}'{needed_by}, which is not available there. "
            f"Available: {avail} ({where}).{partial}{opaque}",
            stage_path=path,
            field=f,
            code="missing_input",
            hint="; or ".join(fixes),
        )


def _strict_error(d: DeferredField, path: str) -> ContractError:
    return ContractError(
        f"Stage '{d.stage}' reads '{d.field}', which only stages with undeclared outputs "
        f"({', '.join(repr(c) for c in d.candidates)}) may produce, and strict contracts are on.",
        stage_path=d.stage,
        field=d.field,
        code="undeclared_output",
        hint=f"declare the producing stage's outputs: Stage(<stage>, writes=['{d.field}', ...]), "
        "or turn strict contracts off (strict=False)",
    )
