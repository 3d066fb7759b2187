"""IAM-like policies attached to principals, and their evaluation.

Document (Huawei IAM ``"Version": "1.1"``, or ``"5.0"``; AWS's ``"2012-10-17"``)::

    {"Version": "1.1",
     "Statement": [{"Effect": "Allow" | "Deny",
                    "Action": ["kms:cmk:decrypt", "kms:dek:*", ...],      # string or list
                    "Resource": ["KMS:*:*:KeyId:<key id>", "*"],          # optional: absent = all
                    "Condition": {"<operator>": {"<condition key>": "v" | ["v", ...]}}}]}

Matching
    Action and Resource patterns take ``*`` and ``?`` wildcards and compare case-insensitively.
    A key's resource name is ``kms:<region>:<project id>:KeyId:<key id>``; APIs not bound to a
    key (create-key, list-keys, gen-random) have the resource ``*``, which only the pattern
    ``*`` (or an absent Resource) matches.  An API may answer to several action names
    (create-datakey is ``kms:dek:create`` and ``kms:cmk:createDataKey``); any one suffices.
Conditions
    All operators of a statement must hold, all keys within an operator, and for each key
    *any* of its values.  Operators: StringEquals, StringEqualsIgnoreCase, StringLike
    (wildcards), Null ("true": the key is absent), Bool.  Condition key names are
    case-insensitive.  A key absent from the request context fails every operator except Null —
    so a PCR condition without a verified attestation document is not met.
Decision
    Default deny; an Allow statement that matches grants; a matching Deny statement wins over
    any Allow.  A principal without a policy is denied everything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

VERSIONS = ("1.1", "5.0", "2012-10-17")     # Huawei IAM; AWS IAM (for the AWS protocol)
EFFECTS = ("Allow", "Deny")
OPERATORS = ("StringEquals", "StringEqualsIgnoreCase", "StringLike", "Null", "Bool")
MAX_STATEMENTS = 64
MAX_ITEMS = 64
MAX_STRING = 512
_STATEMENT_KEYS = {"Effect", "Action", "Resource", "Condition", "Sid"}
_DOCUMENT_KEYS = {"Version", "Statement"}

Context = Mapping[str, "str | bool"]


class PolicyError(ValueError):
    """The policy document is malformed; the message names the offending part."""


@dataclass(frozen=True)
class Condition:
    operator: str
    key: str            # lower-cased
    values: tuple       # strings, or booleans for Null / Bool


@dataclass(frozen=True)
class Statement:
    effect: str
    actions: tuple[str, ...]
    resources: tuple[str, ...] | None
    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class Policy:
    version: str
    statements: tuple[Statement, ...]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


# --------------------------------------------------------------------------- parsing


def parse_policy(document: object) -> Policy:
    """Validate a policy document (decoded JSON); PolicyError names what is wrong."""
    if not isinstance(document, dict):
        raise PolicyError("a policy is a JSON object")
    _known_keys(document, _DOCUMENT_KEYS, "policy")
    version = document.get("Version")
    if version not in VERSIONS:
        raise PolicyError(f"Version must be one of {', '.join(VERSIONS)}")
    statements = document.get("Statement")
    if not isinstance(statements, list) or not 1 <= len(statements) <= MAX_STATEMENTS:
        raise PolicyError(f"Statement must be a list of 1..{MAX_STATEMENTS} statements")
    return Policy(version, tuple(_statement(item, f"Statement[{index}]")
                                 for index, item in enumerate(statements)))


def _statement(item: object, where: str) -> Statement:
    if not isinstance(item, dict):
        raise PolicyError(f"{where} must be an object")
    _known_keys(item, _STATEMENT_KEYS, where)
    effect = item.get("Effect")
    if effect not in EFFECTS:
        raise PolicyError(f"{where}.Effect must be Allow or Deny")
    actions = _strings(item.get("Action"), f"{where}.Action")
    resources = None
    if "Resource" in item:
        resources = _strings(item["Resource"], f"{where}.Resource")
    conditions = _conditions(item.get("Condition", {}), f"{where}.Condition")
    return Statement(effect, actions, resources, conditions)


def _conditions(block: object, where: str) -> tuple[Condition, ...]:
    if not isinstance(block, dict):
        raise PolicyError(f"{where} must be an object")
    conditions = []
    for operator, keys in block.items():
        if operator not in OPERATORS:
            raise PolicyError(f"{where}: unsupported operator {operator[:64]!r} "
                              f"(use {', '.join(OPERATORS)})")
        if not isinstance(keys, dict) or not keys:
            raise PolicyError(f"{where}.{operator} must map condition keys to values")
        for key, values in keys.items():
            place = f"{where}.{operator}.{key[:64]}"
            if not 0 < len(key) <= MAX_STRING:
                raise PolicyError(f"{place}: condition key of bad length")
            conditions.append(Condition(operator, key.lower(), _values(operator, values, place)))
            if len(conditions) > MAX_ITEMS:
                raise PolicyError(f"{where}: more than {MAX_ITEMS} conditions")
    return tuple(conditions)


def _values(operator: str, values: object, where: str) -> tuple:
    items = values if isinstance(values, list) else [values]
    if operator in ("Null", "Bool"):
        return tuple(_boolean(item, where) for item in _bounded(items, where))
    return _strings(items, where)


def _boolean(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise PolicyError(f"{where}: expected true or false")


def _strings(value: object, where: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    for item in _bounded(items, where):
        if not isinstance(item, str) or not 0 < len(item) <= MAX_STRING:
            raise PolicyError(f"{where}: expected non-empty strings of ≤ {MAX_STRING} characters")
    return tuple(items)


def _bounded(items: list, where: str) -> list:
    if not 1 <= len(items) <= MAX_ITEMS:
        raise PolicyError(f"{where}: expected 1..{MAX_ITEMS} values")
    return items


def _known_keys(mapping: dict, known: set, where: str) -> None:
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise PolicyError(f"{where}: unknown field {unknown[0][:64]!r}")


# --------------------------------------------------------------------------- evaluation


def evaluate(policy: Policy | None, actions: tuple[str, ...], resource: str,
             context: Context) -> Decision:
    """Whether a request for any of ``actions`` on ``resource`` is allowed, and why."""
    if policy is None:
        return Decision(False, "the principal has no policy")
    lowered = {key.lower(): value for key, value in context.items()}
    allowed_by, unmet = None, None
    for index, statement in enumerate(policy.statements):
        if not statement_applies(statement, actions, resource):
            continue
        failure = _unmet_condition(statement.conditions, lowered)
        if failure is not None:
            unmet = unmet or f"Statement[{index}]: {failure}"
            continue
        if statement.effect == "Deny":
            return Decision(False, f"explicitly denied by Statement[{index}]")
        allowed_by = allowed_by if allowed_by is not None else index
    if allowed_by is not None:
        return Decision(True, f"allowed by Statement[{allowed_by}]")
    return Decision(False, unmet or f"no statement allows {actions[0]} on {resource}")


def statement_applies(statement: Statement, actions: tuple[str, ...], resource: str) -> bool:
    """Whether ``statement`` covers the request: one of its Action patterns matches one of
    ``actions`` and its Resource (absent: all) matches ``resource`` (see the module docstring).
    Its conditions are not looked at (:func:`condition_holds`); :func:`evaluate` and the
    explanation in ``policy_author`` both decide with it, so they cannot disagree."""
    if not any(_match(pattern, action) for pattern in statement.actions for action in actions):
        return False
    if statement.resources is None:
        return True
    return any(pattern == "*" or (resource != "*" and _match(pattern, resource))
               for pattern in statement.resources)


def _unmet_condition(conditions: tuple[Condition, ...], context: dict) -> str | None:
    """A description of the first condition that does not hold, or None if all hold."""
    for condition in conditions:
        if not condition_holds(condition, context):
            present = "absent" if condition.key not in context else "not matched"
            return f"condition {condition.operator} {condition.key} {present}"
    return None


def condition_holds(condition: Condition, context: Context) -> bool:
    """Whether the request context meets ``condition`` (its operator, for any of its values);
    ``context``'s keys must be lower-cased, as :func:`evaluate` makes them."""
    operator, values = condition.operator, condition.values
    if operator == "Null":
        return (condition.key not in context) in values
    if condition.key not in context:
        return False
    actual = context[condition.key]
    if operator == "Bool":
        return isinstance(actual, bool) and actual in values
    if not isinstance(actual, str):
        return False
    if operator == "StringEquals":
        return actual in values
    if operator == "StringEqualsIgnoreCase":
        return actual.casefold() in {value.casefold() for value in values}
    return any(_match(value, actual, ignore_case=False) for value in values)


def _match(pattern: str, text: str, *, ignore_case: bool = True) -> bool:
    """Glob match: ``*`` any run of characters, ``?`` any one; O(len(pattern) × len(text))."""
    if ignore_case:
        pattern, text = pattern.casefold(), text.casefold()
    p = t = 0
    star, resume = -1, 0
    while t < len(text):
        if p < len(pattern) and pattern[p] == "*":
            star, resume = p, t
            p += 1
        elif p < len(pattern) and pattern[p] in ("?", text[t]):
            p, t = p + 1, t + 1
        elif star >= 0:
            p, resume = star + 1, resume + 1
            t = resume
        else:
            return False
    return pattern[p:].strip("*") == ""
