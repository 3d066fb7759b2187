"""Writing and explaining policies: the API → action table, the common "allow this enclave to
decrypt with this key" document, and a statement-by-statement account of a decision.

The verdict always comes from :func:`qtbuild.runtime.kms.policy.evaluate` (the one engine the
KMS uses); :func:`explain` only adds, per statement, why it did or did not apply.
"""

from __future__ import annotations

from dataclasses import dataclass

from qtbuild.runtime.kms.policy import (
    Condition,
    Context,
    Decision,
    Policy,
    Statement,
    condition_holds,
    evaluate,
    parse_policy,
    statement_applies,
)

# The action names each API answers to (any one of them suffices; see operations.py).
API_ACTIONS: dict[str, tuple[str, ...]] = {
    "create-key": ("kms:cmk:create",),
    "list-keys": ("kms:cmk:list",),
    "describe-key": ("kms:cmk:get",),
    "enable-key": ("kms:cmk:enable",),
    "disable-key": ("kms:cmk:disable",),
    "schedule-key-deletion": ("kms:cmk:update",),
    "cancel-key-deletion": ("kms:cmk:update",),
    "encrypt-data": ("kms:cmk:encrypt",),
    "decrypt-data": ("kms:cmk:decrypt",),
    "create-datakey": ("kms:dek:create", "kms:cmk:createDataKey"),
    "create-datakey-without-plaintext": ("kms:dek:create", "kms:cmk:createDataKey"),
    "encrypt-datakey": ("kms:dek:encrypt", "kms:dek:crypto"),
    "decrypt-datakey": ("kms:dek:decrypt",),
    "gen-random": ("kms:cmk:generate",),
}
PCR0_KEY = "kms:RecipientAttestation/PCR0"
PCR8_KEY = "kms:RecipientAttestation/PCR8"


def actions_for(name: str) -> tuple[str, ...]:
    """The action names of an API (``decrypt-data``) or an action given as is (``kms:cmk:decrypt``)."""
    if name in API_ACTIONS:
        return API_ACTIONS[name]
    if name.lower().startswith("kms:") and name.count(":") == 2:
        return (name,)
    raise ValueError(f"unknown API or action {name!r} (an API such as decrypt-data, "
                     f"or an action such as kms:cmk:decrypt)")


def key_resource(key_id: str) -> str:
    """The Resource pattern for one key in any region and project: ``KMS:*:*:KeyId:<key id>``."""
    return f"KMS:*:*:KeyId:{key_id}"


def allow_policy(apis: list[str], key_id: str, pcr0: list[str], pcr8: list[str] | None = None) -> dict:
    """A one-statement document allowing ``apis`` on ``key_id`` only to a recipient whose PCR0
    is one of ``pcr0`` (and PCR8 one of ``pcr8`` when given); validated before it is returned."""
    actions = sorted({action for api in apis for action in actions_for(api)[:1]})
    condition: dict[str, str | list[str]] = {PCR0_KEY: _one_or_list([value.lower() for value in pcr0])}
    if pcr8:
        condition[PCR8_KEY] = _one_or_list([value.lower() for value in pcr8])
    document = {"Version": "1.1", "Statement": [{
        "Effect": "Allow", "Action": actions, "Resource": [key_resource(key_id)],
        "Condition": {"StringEqualsIgnoreCase": condition}}]}
    parse_policy(document)
    return document


def _one_or_list(values: list[str]) -> str | list[str]:
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class StatementReport:
    """What one statement did for the request: ``outcome`` is ``not applicable`` (action or
    resource not matched), ``condition failed`` or ``matched``; ``detail`` says why."""

    index: int
    effect: str
    outcome: str
    detail: str


@dataclass(frozen=True)
class Explanation:
    decision: Decision
    statements: tuple[StatementReport, ...]


def explain(policy: Policy | None, actions: tuple[str, ...], resource: str, context: Context) -> Explanation:
    """The engine's decision plus, per statement, which part matched or failed."""
    decision = evaluate(policy, actions, resource, context)
    if policy is None:
        return Explanation(decision, ())
    lowered = {key.lower(): value for key, value in context.items()}
    reports = tuple(_report(index, statement, actions, resource, lowered)
                    for index, statement in enumerate(policy.statements))
    return Explanation(decision, reports)


def _report(index: int, statement: Statement, actions: tuple[str, ...], resource: str,
            context: dict) -> StatementReport:
    if not statement_applies(statement, actions, resource):
        return StatementReport(index, statement.effect, "not applicable",
                               f"Action {list(statement.actions)} / Resource "
                               f"{list(statement.resources or ['(any)'])} do not cover "
                               f"{' or '.join(actions)} on {resource}")
    for condition in statement.conditions:
        if not condition_holds(condition, context):
            return StatementReport(index, statement.effect, "condition failed",
                                   _failure(condition, context))
    held = len(statement.conditions)
    return StatementReport(index, statement.effect, "matched",
                           f"action and resource match; {held} condition(s) hold")


def _failure(condition: Condition, context: dict) -> str:
    wanted = ", ".join(str(value) for value in condition.values)
    if condition.operator != "Null" and condition.key not in context:
        return (f"{condition.operator} {condition.key}: the request has no such key "
                f"(a PCR key needs a verified attestation document); wanted {wanted}")
    actual = context.get(condition.key, "(absent)")
    return f"{condition.operator} {condition.key}: wanted {wanted}, the request has {actual}"
