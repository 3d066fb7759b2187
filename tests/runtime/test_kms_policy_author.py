"""Policy authoring: the generated common-case document and the statement-by-statement account
``kms policy check`` prints, against the engine the KMS itself uses."""

from __future__ import annotations

import pytest

from qtbuild.runtime.kms.policy import evaluate, parse_policy
from qtbuild.runtime.kms.policy_author import (
    PCR0_KEY,
    PCR8_KEY,
    actions_for,
    allow_policy,
    explain,
)

KEY = "0d0466b0-e727-4d9e-b1d7-3f3e2a6a1b11"
RESOURCE = f"kms:local:project1:KeyId:{KEY}"
PCR0, OTHER = "ab" * 48, "cd" * 48
SIGNER = "ef" * 48


def _context(pcr0: str, pcr8: str = "00" * 48) -> dict:
    return {PCR0_KEY: pcr0, PCR8_KEY: pcr8}


def test_generated_policy_allows_only_the_measured_enclave_on_the_key():
    document = allow_policy(["decrypt-data"], KEY, [PCR0.upper()])
    assert document == {"Version": "1.1", "Statement": [{
        "Effect": "Allow", "Action": ["kms:cmk:decrypt"], "Resource": [f"KMS:*:*:KeyId:{KEY}"],
        "Condition": {"StringEqualsIgnoreCase": {PCR0_KEY: PCR0}}}]}
    policy = parse_policy(document)
    decrypt = actions_for("decrypt-data")
    assert evaluate(policy, decrypt, RESOURCE, _context(PCR0)).allowed
    assert not evaluate(policy, decrypt, RESOURCE, _context(OTHER)).allowed
    assert not evaluate(policy, decrypt, RESOURCE, {}).allowed
    assert not evaluate(policy, decrypt, RESOURCE.replace(KEY, "another-key"), _context(PCR0)).allowed
    assert not evaluate(policy, actions_for("encrypt-data"), RESOURCE, _context(PCR0)).allowed


def test_generated_policy_with_pcr8_needs_both():
    policy = parse_policy(allow_policy(["decrypt-data", "create-datakey"], KEY, [PCR0], [SIGNER]))
    assert policy.statements[0].actions == ("kms:cmk:decrypt", "kms:dek:create")
    assert evaluate(policy, actions_for("create-datakey"), RESOURCE, _context(PCR0, SIGNER)).allowed
    assert not evaluate(policy, actions_for("decrypt-data"), RESOURCE, _context(PCR0)).allowed


def test_unknown_api_is_named():
    with pytest.raises(ValueError, match="decrypt-dat"):
        allow_policy(["decrypt-dat"], KEY, [PCR0])
    assert actions_for("kms:dek:decrypt") == ("kms:dek:decrypt",)


def test_explain_names_the_failed_condition_and_the_values():
    policy = parse_policy(allow_policy(["decrypt-data"], KEY, [PCR0]))
    account = explain(policy, actions_for("decrypt-data"), RESOURCE, _context(OTHER))
    assert not account.decision.allowed
    (report,) = account.statements
    assert report.outcome == "condition failed"
    assert PCR0 in report.detail and OTHER in report.detail
    absent = explain(policy, actions_for("decrypt-data"), RESOURCE, {}).statements[0]
    assert "no such key" in absent.detail


def test_explain_deny_wins_and_inapplicable_statements_say_why():
    document = allow_policy(["decrypt-data"], KEY, [PCR0])
    document["Statement"].append({"Effect": "Deny", "Action": "kms:cmk:*"})
    document["Statement"].append({"Effect": "Allow", "Action": "kms:dek:*"})
    account = explain(parse_policy(document), actions_for("decrypt-data"), RESOURCE, _context(PCR0))
    assert not account.decision.allowed and "Statement[1]" in account.decision.reason
    outcomes = [(report.effect, report.outcome) for report in account.statements]
    assert outcomes == [("Allow", "matched"), ("Deny", "matched"), ("Allow", "not applicable")]


def test_no_policy_denies_without_statements():
    account = explain(None, actions_for("decrypt-data"), RESOURCE, {})
    assert not account.decision.allowed and account.statements == ()
