"""Policy documents (runtime/kms/policy.py): validation and evaluation semantics."""

from __future__ import annotations

import pytest

from qtbuild.runtime.kms.policy import PolicyError, evaluate, parse_policy

KEY = "kms:local:proj:KeyId:1e31e152-6e34-46dc-b12b-6431dfcbd3a3"
PCR0 = "ab" * 48
HUAWEI_PCR0 = "kms:RecipientAttestation/PCR0"


def policy(*statements, version="1.1"):
    return parse_policy({"Version": version, "Statement": list(statements)})


def allow(action="kms:cmk:decrypt", **extra):
    return {"Effect": "Allow", "Action": [action], **extra}


def decide(document, actions=("kms:cmk:decrypt",), resource=KEY, context=None):
    return evaluate(document, actions, resource, context or {})


def test_default_deny_and_no_policy():
    assert not decide(None).allowed
    decision = decide(policy(allow("kms:cmk:encrypt")))
    assert not decision.allowed and "no statement allows" in decision.reason


def test_actions_match_with_wildcards_and_ignoring_case():
    assert decide(policy(allow("kms:cmk:*"))).allowed
    assert decide(policy(allow("KMS:CMK:Decrypt"))).allowed
    assert decide(policy(allow("kms:*:decry?t"))).allowed
    assert not decide(policy(allow("kms:dek:*"))).allowed
    assert decide(policy(allow("kms:cmk:createDataKey")),
                  actions=("kms:dek:create", "kms:cmk:createDataKey")).allowed


def test_resources():
    assert decide(policy(allow(Resource=["KMS:*:*:KeyId:" + KEY.rsplit(":", 1)[1]]))).allowed
    assert not decide(policy(allow(Resource=["KMS:*:*:KeyId:other"]))).allowed
    assert decide(policy(allow(Resource="*"))).allowed
    # APIs without a key: only "*" (or no Resource) covers them
    assert not decide(policy(allow("kms:cmk:generate", Resource=["KMS:*:*:KeyId:*"])),
                      actions=("kms:cmk:generate",), resource="*").allowed
    assert decide(policy(allow("kms:cmk:generate")), actions=("kms:cmk:generate",),
                  resource="*").allowed


def test_explicit_deny_wins():
    document = policy(allow("kms:*"), {"Effect": "Deny", "Action": "kms:cmk:decrypt",
                                       "Resource": [KEY]})
    decision = decide(document)
    assert not decision.allowed and "explicitly denied by Statement[1]" in decision.reason
    assert decide(document, actions=("kms:cmk:encrypt",)).allowed


def test_pcr_conditions():
    pinned = policy(allow(Condition={"StringEqualsIgnoreCase": {HUAWEI_PCR0: PCR0.upper()}}))
    assert decide(pinned, context={HUAWEI_PCR0: PCR0}).allowed
    assert not decide(pinned, context={HUAWEI_PCR0: "cd" * 48}).allowed
    missing = decide(pinned)
    assert not missing.allowed and "absent" in missing.reason
    exact = policy(allow(Condition={"StringEquals": {"kms:RecipientAttestation:ImageSha384":
                                                     [PCR0, "00" * 48]}}))
    assert decide(exact, context={"kms:RecipientAttestation:ImageSha384": PCR0}).allowed
    assert not decide(exact, context={"kms:RecipientAttestation:ImageSha384": PCR0.upper()}
                      ).allowed


def test_condition_keys_are_case_insensitive_and_all_must_hold():
    both = policy(allow(Condition={
        "StringEqualsIgnoreCase": {"KMS:recipientattestation/pcr0": PCR0},
        "StringLike": {"kms:RecipientAttestation:PCR8": "00*"},
    }))
    context = {HUAWEI_PCR0: PCR0, "kms:RecipientAttestation:PCR8": "00" * 48}
    assert decide(both, context=context).allowed
    assert not decide(both, context={**context, "kms:RecipientAttestation:PCR8": "11" * 48}
                      ).allowed


def test_null_and_bool():
    absent = policy(allow(Condition={"Null": {HUAWEI_PCR0: "true"}}))
    assert decide(absent).allowed
    assert not decide(absent, context={HUAWEI_PCR0: PCR0}).allowed
    present = policy(allow(Condition={"Null": {HUAWEI_PCR0: False}}))
    assert decide(present, context={HUAWEI_PCR0: PCR0}).allowed
    flag = policy(allow(Condition={"Bool": {"g:Flag": "true"}}))
    assert decide(flag, context={"g:flag": True}).allowed
    assert not decide(flag, context={"g:flag": False}).allowed
    assert not decide(flag, context={"g:flag": "true"}).allowed
    assert not decide(flag).allowed


def test_deny_with_an_unmet_condition_does_not_apply():
    document = policy(allow(), {"Effect": "Deny", "Action": "kms:*", "Condition": {
        "StringEquals": {HUAWEI_PCR0: "00" * 48}}})
    assert decide(document, context={HUAWEI_PCR0: PCR0}).allowed
    assert not decide(document, context={HUAWEI_PCR0: "00" * 48}).allowed


@pytest.mark.parametrize("document, message", [
    ([], "JSON object"),
    ({"Version": "2008-10-17", "Statement": [allow()]}, "Version"),     # 2012-10-17 is AWS's, accepted
    ({"Version": "1.1", "Statement": []}, "Statement"),
    ({"Version": "1.1", "Statement": [allow()], "Extra": 1}, "unknown field"),
    ({"Version": "1.1", "Statement": [{"Effect": "Maybe", "Action": "kms:*"}]}, "Effect"),
    ({"Version": "1.1", "Statement": [{"Effect": "Allow"}]}, "Action"),
    ({"Version": "1.1", "Statement": [{"Effect": "Allow", "Action": [1]}]}, "Action"),
    ({"Version": "1.1", "Statement": [allow(Condition={"NumericEquals": {"a": "1"}})]},
     "unsupported operator"),
    ({"Version": "1.1", "Statement": [allow(Condition={"Bool": {"a": "maybe"}})]},
     "true or false"),
    ({"Version": "1.1", "Statement": [allow(Condition={"StringEquals": {"a": []}})]},
     "1..64 values"),
    ({"Version": "1.1", "Statement": [allow(Condition={"StringEquals": "x"})]},
     "map condition keys"),
    ({"Version": "1.1", "Statement": [allow()] * 65}, "Statement"),
])
def test_malformed_documents(document, message):
    with pytest.raises(PolicyError, match=message):
        parse_policy(document)


def test_version_5_is_accepted():
    assert policy(allow(), version="5.0").version == "5.0"


def test_wildcards_are_linear():
    document = policy(allow("*a" * 200 + "b"))
    assert not decide(document, actions=("a" * 500,)).allowed
