"""``stageflow.fingerprint(program)``: a content hash of everything that decides a program's outputs
besides its inputs.

It covers, recursively through nested pipelines and modules:

- every **predictor**: its signature (instructions, field names, descriptions and prefixes, and
  each field's *type by its definition*: a pydantic model by its JSON schema and validators, an
  enum by its members, a dataclass by its fields — an output model that gains a field changes
  it), its demos, its LM (class, model, ``kwargs`` such as temperature) — its own, or the one
  ``dspy.context``/``dspy.configure`` provides — its ``config``, the active adapter and the DSPy
  version, *as they are at call time*: editing ``demos[0]`` or ``lm.kwargs`` in place changes it;
- **your subclasses** of DSPy's predictors and LMs (``class MyPredict(dspy.Predict)``,
  ``class MyLM(dspy.BaseLM)``): the code of your class (an edited ``forward``) and the instance
  attributes your code sets (``lm.weights = "B.gguf"``);
- every **function** (a function stage, a router, a stopping condition, a callable held by a
  module, the function inside a ``functools.cache``/``wraps`` wrapper): its code including
  constants and nested functions, its defaults, keyword defaults, closure values and the
  module-level names it reads (helper functions recursively, constants by value) — and, for a
  module of yours that it reads through (``cfg.FACTOR``, ``cfg.sub.VALUE``), the attributes its
  code names. ``x * 2`` → ``x * 3`` changes it, so a persistent cache never serves a stale output
  in a later run;
- every **object** a stage holds: its class (for your own classes, the code of all their methods,
  ``__call__`` and other dunder methods included, and their annotations) and its attributes (for
  library classes, the public ones). Caches, profilers and tracers are left out: running a program
  does not change its fingerprint.

The hash is stable across processes and machines for the same program and Python minor version.
It is cheap when nothing changed: a small change-detection token (weak references and plain
values, never ``id()``) is rebuilt per call and compared with the last one; the content hash is
recomputed only when the token differs. Nothing here keeps a program alive.

Not covered (documented, not silent):

- what a program reads from outside itself at run time: environment variables, files, the clock,
  random numbers, a database or a web service;
- library code (the standard library, installed packages, stageflow and DSPy) is represented by
  its qualified name, not its code; attributes of *library* modules are not followed
  (``os.environ[...]``, ``np.pi``, ``mypkg.settings.X`` for an installed ``mypkg``), nor names
  read with a computed name (``getattr(cfg, name)``, ``globals()[name]``, ``vars()``, ``eval``,
  ``exec``; for the last four the stage cache and batch runs warn, see
  :mod:`stageflow._fp_dynamic`);
- in your subclass of a DSPy predictor or LM, an attribute whose name DSPy's (or stageflow's)
  classes assign themselves (``model``, ``kwargs``, ``demos``; ``FakeLM``'s ``responses``) counts
  as theirs: only what stageflow reads of it (model, model type, ``kwargs``; signature, demos,
  config; a ``FakeLM``'s script and default text, its ``stageflow_identity``) is part of the
  fingerprint;
- containers are followed up to a budget of about 2,000 values per fingerprint; beyond it a
  container is represented by its type, length, a few sampled items and a digest of all its items
  when they can be hashed (text, numbers) — a big list of lists is represented by the sample only;
- plain data *inside* a list, dict or set (a captured one, a module's, an attribute) is hashed when
  the program is first fingerprinted, and the result is remembered while the program's structure
  stays the same: an in-place edit of that data later in the same process is seen by
  ``fresh=True``, by cache keys and by batch journals (:mod:`stageflow._fp_calls`), not by a plain
  ``fingerprint(program)`` call. Data created with :func:`stageflow.untracked` (a stage's own call
  log or counter) is left out of every fingerprint;
- a class used as a signature field type is described once per class object; a pydantic model
  rebuilt in place (``model_rebuild(force=True)`` with other fields) is seen by its new validator,
  other classes edited in place (an enum's members) are not — define a new class. A signature's
  own fields are watched on every call: a default (an equal value of another type too, and a list
  default edited in place), type, description or prefix edited in place on the signature class is
  seen on the next call. A default that is not plain text or a number is described on every call
  by what DSPy would send of it (its ``str``, a dataclass's or model's fields): a huge one (a list
  of 100,000 items) costs milliseconds per cached call.

Examples:
    >>> import stageflow
    >>> a = stageflow.SequentialPipeline([stageflow.stage(lambda x: {"y": x * 2}, writes=["y"])])
    >>> b = stageflow.SequentialPipeline([stageflow.stage(lambda x: {"y": x * 3}, writes=["y"])])
    >>> fp = stageflow.fingerprint
    >>> fp(a) == fp(a), fp(a) == fp(b)
    (True, False)
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import threading
import weakref
from typing import Any

from stageflow._fp_digest import Bag, Ref, recording_views, same, views_hold, weaken
from stageflow._fp_predict import PredictMemo
from stageflow._fp_walker import Walker

__all__ = ["fingerprint"]

_MEMO: weakref.WeakKeyDictionary[Any, tuple[Any, str]] = weakref.WeakKeyDictionary()
# predictor -> its fast memo, keyed by a weak reference (a plain dict: looked up on every cached call)
_PREDICT_MEMO: dict[weakref.ref[Any], PredictMemo] = {}
_LOCK = threading.Lock()


def fingerprint(program: Any, *, fresh: bool = False) -> str:
    """A content hash (hex string) of everything that decides ``program``'s outputs besides its inputs.

    ``program`` is anything stageflow runs: a pipeline (every stage in it, nested pipelines
    included), a ``dspy.Module`` or predictor, a function or a callable object. See the module
    docstring for what it covers.

    The hash of an object is remembered while its structure stays the same, so repeated calls are
    cheap; a mutable value a function reads from its module (a set, a dict) that is changed in place
    does not change that structure. ``fresh=True`` hashes all of the content again (and remembers the
    new hash): what a batch journal compares before it resumes.
    """
    return structural(unwrap(program), fresh=fresh)[0]


def unwrap(program: Any) -> Any:
    """What is fingerprinted for ``program``: a function stage's function (its name and flags do not
    change outputs), anything else itself."""
    return program.fn if type(program) is _function_stage_type() else program


def structural(target: Any, *, fresh: bool = False) -> tuple[str, bool]:
    """``(fingerprint, elided)``: :func:`fingerprint` of ``target`` (already :func:`unwrap` ped), and
    whether its change-detection token left plain data out (a list, dict or set's items, an array):
    then an in-place edit of that data is not seen by the memo (see :mod:`stageflow._fp_calls`)."""
    dspy = sys.modules.get("dspy")
    predictor = dspy is not None and issubclass(type(target), dspy.Predict)
    if predictor and not fresh:
        try:
            fast = _PREDICT_MEMO.get(weakref.ref(target))  # a fresh reference finds the stored one
            if fast is not None and fast.matches(target):
                return fast.fp, False  # (a memo is built only for plain state: nothing left out)
        except (TypeError, ValueError):  # unhashable, or a setting whose == is not a bool (an array)
            pass
    walker = Walker()
    with recording_views() as seen:
        token = walker.token(target)
    try:
        memo = None if fresh else _MEMO.get(target)
    except TypeError:  # unhashable: no memo, the content is hashed every time
        memo = None
    held = True
    if memo is not None and same(memo[0], token):
        fp = memo[1]
    else:
        with recording_views() as views:
            fp = content_hash(target)
        # (unchanged while hashing — another thread may edit it, even edit it back: the signatures
        # described must still have the fields the hash saw)
        held = same(Walker().token(target), token) and views_hold(seen, views)
        if held:
            _remember(_MEMO, target, (weaken(token), fp))
    if predictor and not walker.elided and held:
        with recording_views() as observed:
            fast = PredictMemo.build(target, fp)
        if fast is not None and same(Walker().token(target), token) and views_hold(seen, observed):
            with _LOCK, contextlib.suppress(TypeError):
                _PREDICT_MEMO[weakref.ref(target, _forget)] = fast
    return fp, walker.elided


def content_hash(target: Any) -> str:
    """The hash of ``target``'s complete description."""
    full = _content(Walker(final=True).token(target))
    return hashlib.sha256(repr(full).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _forget(ref: weakref.ref[Any]) -> None:
    _PREDICT_MEMO.pop(ref, None)  # the predictor is gone (a dead reference still finds its entry)


def _remember(memo: weakref.WeakKeyDictionary[Any, Any], target: Any, value: Any) -> None:
    try:
        with _LOCK:
            memo[target] = value
    except TypeError:
        pass  # not weak-referenceable or unhashable: no memo


def _function_stage_type() -> Any:
    """``FunctionStage`` once stageflow's stages are imported; ``None`` before."""
    stages = sys.modules.get("stageflow.stages")
    return None if stages is None else stages.FunctionStage


def _content(node: Any) -> Any:
    """The token with every weak reference replaced by a stable description of its object."""
    t = type(node)
    if t is tuple:
        return tuple(_content(x) for x in node)
    if t is Bag:
        return ("bag", *sorted((_content(x) for x in node), key=repr))
    if t is Ref:
        return node.describe()
    return node
