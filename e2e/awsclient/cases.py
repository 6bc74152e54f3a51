"""The AWS clients' side of the end-to-end tests of kubekms's AWS API (e2e/tests/aws.rs):
boto3 (and so botocore, as the AWS CLI and SDK tools use it) and the AWS Encryption SDK,
configured only by the environment a pod would have — AWS_ROLE_ARN,
AWS_WEB_IDENTITY_TOKEN_FILE, AWS_ENDPOINT_URL_STS, AWS_ENDPOINT_URL_KMS, AWS_CA_BUNDLE and
AWS_REGION. Each case prints one JSON object for the Rust test to check.

  cases.py roundtrip KEY_ARN KEY_NAME [GRPC_CIPHERTEXT_B64]
  cases.py errors KEY_ARN DISABLED_KEY_ARN
  cases.py assume ROLE_ARN TOKEN_FILE          (STS directly: the error code, or the expiry)
  cases.py call OPERATION JSON                 (one call: the answer, or the error code)
  cases.py esdk KEY_ARN                        (AWS Encryption SDK, a KMS master key)
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import ssl
import sys
import urllib.error
import urllib.request

import boto3
import botocore.auth
import botocore.awsrequest
import botocore.credentials
from botocore.config import Config
from botocore.exceptions import ClientError

# No retries: a refusal must show as the refusal.
CONFIG = Config(retries={"max_attempts": 1, "mode": "standard"})


def kms():
    return boto3.client("kms", config=CONFIG)


def code_of(call) -> str:
    try:
        call()
    except ClientError as e:
        return e.response["Error"]["Code"]
    return "OK"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def roundtrip(arn: str, name: str, grpc_ciphertext: str | None) -> dict:
    k = kms()
    ctx = {"app": "e2e"}
    out: dict = {}
    enc = k.encrypt(KeyId=arn, Plaintext=b"hello from boto3", EncryptionContext=ctx)
    out["encrypt_key_id"] = enc["KeyId"]
    out["encryption_algorithm"] = enc["EncryptionAlgorithm"]
    out["ciphertext"] = b64(enc["CiphertextBlob"])
    dec = k.decrypt(CiphertextBlob=enc["CiphertextBlob"], EncryptionContext=ctx)
    out["decrypt_plaintext"] = dec["Plaintext"].decode()
    out["decrypt_key_id"] = dec["KeyId"]
    out["decrypt_with_key_id"] = k.decrypt(CiphertextBlob=enc["CiphertextBlob"], EncryptionContext=ctx,
                                           KeyId=arn)["Plaintext"].decode()
    # The keyId alone, and kubekms's namespace/name.
    key_id = arn.rsplit("/", 1)[1]
    out["encrypt_by_id"] = k.encrypt(KeyId=key_id, Plaintext=b"x")["KeyId"]
    out["encrypt_by_name"] = k.encrypt(KeyId=name, Plaintext=b"x")["KeyId"]
    gdk = k.generate_data_key(KeyId=arn, KeySpec="AES_256", EncryptionContext=ctx)
    out["data_key_len"] = len(gdk["Plaintext"])
    out["data_key_opens"] = k.decrypt(CiphertextBlob=gdk["CiphertextBlob"],
                                      EncryptionContext=ctx)["Plaintext"] == gdk["Plaintext"]
    out["data_key_128_len"] = len(k.generate_data_key(KeyId=arn, NumberOfBytes=16)["Plaintext"])
    wp = k.generate_data_key_without_plaintext(KeyId=arn, KeySpec="AES_128")
    out["without_plaintext_len"] = len(k.decrypt(CiphertextBlob=wp["CiphertextBlob"])["Plaintext"])
    out["without_plaintext_has_plaintext"] = "Plaintext" in wp
    re = k.re_encrypt(CiphertextBlob=enc["CiphertextBlob"], SourceEncryptionContext=ctx, DestinationKeyId=arn,
                      DestinationEncryptionContext={"app": "moved"})
    out["reencrypt_source_key_id"] = re["SourceKeyId"]
    out["reencrypted_plaintext"] = k.decrypt(CiphertextBlob=re["CiphertextBlob"],
                                             EncryptionContext={"app": "moved"})["Plaintext"].decode()
    out["random_len"] = len(k.generate_random(NumberOfBytes=48)["Plaintext"])
    meta = k.describe_key(KeyId=arn)["KeyMetadata"]
    meta["CreationDate"] = meta["CreationDate"].isoformat()
    out["metadata"] = meta
    out["rotation"] = {k2: v for k2, v in k.get_key_rotation_status(KeyId=arn).items() if k2 != "ResponseMetadata"}
    if grpc_ciphertext:
        out["grpc_plaintext"] = k.decrypt(CiphertextBlob=base64.b64decode(grpc_ciphertext))["Plaintext"].decode()
    return out


def ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=os.environ["AWS_CA_BUNDLE"])


def raw(target: str, body: bytes, creds, *, send_body: bytes | None = None, when=None, headers=None) -> tuple:
    """One KMS call signed by botocore's own SigV4 signer and sent as is (or with
    `send_body` instead of the signed body): (status, __type)."""
    url = os.environ["AWS_ENDPOINT_URL_KMS"] + "/"
    request = botocore.awsrequest.AWSRequest(method="POST", url=url, data=body, headers={
        "X-Amz-Target": f"TrentService.{target}", "Content-Type": "application/x-amz-json-1.1", **(headers or {})})
    if creds is not None:
        signer = botocore.auth.SigV4Auth(creds, "kms", os.environ["AWS_REGION"])
        if when is not None:
            real = botocore.auth.get_current_datetime
            botocore.auth.get_current_datetime = lambda: when
            try:
                signer.add_auth(request)
            finally:
                botocore.auth.get_current_datetime = real
        else:
            signer.add_auth(request)
    prepared = request.prepare()
    sent = urllib.request.Request(url, data=send_body if send_body is not None else body,
                                  headers=dict(prepared.headers), method="POST")
    try:
        with urllib.request.urlopen(sent, context=ssl_context(), timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}").get("__type", "OK")
    except urllib.error.HTTPError as e:
        doc = json.loads(e.read() or b"{}")
        return e.code, doc.get("__type"), doc.get("message")


def session_credentials():
    creds = boto3.Session().get_credentials()
    return creds.get_frozen_credentials()


def errors(arn: str, disabled_arn: str) -> dict:
    k = kms()
    ctx = {"app": "e2e"}
    blob = k.encrypt(KeyId=arn, Plaintext=b"secret", EncryptionContext=ctx)["CiphertextBlob"]
    out = {
        "junk_ciphertext": code_of(lambda: k.decrypt(CiphertextBlob=b"\x07" + b"x" * 80)),
        # A well-formed blob naming a key nobody has: a keyId of the caller's own account, not found.
        "unknown_key_ciphertext": code_of(lambda: k.decrypt(CiphertextBlob=b"\x01" + b"x" * 80)),
        "wrong_context": code_of(lambda: k.decrypt(CiphertextBlob=blob, EncryptionContext={"app": "other"})),
        "tampered_ciphertext": code_of(lambda: k.decrypt(CiphertextBlob=blob[:-1] + bytes([blob[-1] ^ 1]),
                                                         EncryptionContext=ctx)),
        "wrong_key": code_of(lambda: k.decrypt(CiphertextBlob=blob, EncryptionContext=ctx, KeyId=disabled_arn)),
        "too_large": code_of(lambda: k.encrypt(KeyId=arn, Plaintext=b"x" * 4097)),
        "disabled": code_of(lambda: k.encrypt(KeyId=disabled_arn, Plaintext=b"x")),
        # An alias nobody made in the caller's own account is not found, as is one kubekms cannot hold.
        "alias": code_of(lambda: k.describe_key(KeyId="alias/nope")),
        "malformed_alias": code_of(lambda: k.describe_key(KeyId="alias/aws/ebs")),
        "other_region": code_of(lambda: k.describe_key(KeyId=arn.replace(os.environ["AWS_REGION"], "us-east-1"))),
        "bad_key_spec": code_of(lambda: k.generate_data_key(KeyId=arn, NumberOfBytes=2000)),
    }
    real = session_credentials()
    body = json.dumps({"KeyId": arn}).encode()
    out["genuine"] = raw("DescribeKey", body, real)
    out["unknown_operation"] = raw("CreateCustomKeyStore", b"{}", real)
    wrong = botocore.credentials.Credentials(real.access_key, real.secret_key[:-2] + "AA", real.token)
    out["wrong_secret"] = raw("DescribeKey", body, wrong)
    out["tampered_body"] = raw("DescribeKey", body, real, send_body=json.dumps({"KeyId": disabled_arn}).encode())
    stale = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=6)
    out["stale_date"] = raw("DescribeKey", body, real, when=stale)
    no_token = botocore.credentials.Credentials(real.access_key, real.secret_key)
    out["no_session_token"] = raw("DescribeKey", body, no_token)
    forged = botocore.credentials.Credentials(real.access_key, real.secret_key,
                                              b64(b"\x01" + os.urandom(120)))
    out["forged_session_token"] = raw("DescribeKey", body, forged)
    out["unsigned"] = raw("DescribeKey", body, None)
    out["malformed_authorization"] = raw("DescribeKey", body, None,
                                         headers={"Authorization": "AWS4-HMAC-SHA256 Credential=x"})
    return out


def assume(role_arn: str, token_file: str) -> dict:
    from botocore import UNSIGNED
    sts = boto3.client("sts", config=Config(signature_version=UNSIGNED, retries={"max_attempts": 1}))
    try:
        with open(token_file) as f:
            token = f.read().strip()
        r = sts.assume_role_with_web_identity(RoleArn=role_arn, RoleSessionName="e2e", WebIdentityToken=token)
    except ClientError as e:
        return {"code": e.response["Error"]["Code"], "status": e.response["ResponseMetadata"]["HTTPStatusCode"]}
    c = r["Credentials"]
    return {"code": "OK", "access_key_id": c["AccessKeyId"], "expiration": c["Expiration"].isoformat(),
            "assumed_role_arn": r["AssumedRoleUser"]["Arn"], "subject": r["SubjectFromWebIdentityToken"]}


def call(operation: str, params: str) -> dict:
    return call_with(operation, json.loads(params))


def call_with(operation: str, params: dict) -> dict:
    k = kms()
    try:
        r = getattr(k, operation)(**params)
    except ClientError as e:
        return {"code": e.response["Error"]["Code"], "message": e.response["Error"]["Message"]}
    r.pop("ResponseMetadata", None)
    return {"code": "OK", "answer": json.loads(json.dumps(r, default=str))}


def calls(batch: str) -> list:
    """Several calls in one process: [[operation, params], ...] → [{code, message}, ...]."""
    out = []
    for operation, params in json.loads(batch):
        if isinstance(params.get("CiphertextBlob"), str):
            params["CiphertextBlob"] = base64.b64decode(params["CiphertextBlob"])
        r = call_with(operation, params)
        out.append({"code": r["code"], "message": r.get("message", "")})
    return out


def esdk(arn: str) -> dict:
    import aws_encryption_sdk
    from aws_encryption_sdk.identifiers import CommitmentPolicy
    client = aws_encryption_sdk.EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
    provider = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[arn])
    message, header = client.encrypt(source=b"hello from the AWS Encryption SDK", key_provider=provider,
                                     encryption_context={"purpose": "e2e"})
    plaintext, decrypted_header = client.decrypt(source=message, key_provider=provider)
    return {"plaintext": plaintext.decode(), "context": decrypted_header.encryption_context.get("purpose"),
            "master_keys": sorted(k.key_info.decode() for k in header.encrypted_data_keys
                                  for k in [k.key_provider])}


def main() -> int:
    case, *args = sys.argv[1:]
    cases = {"roundtrip": roundtrip, "errors": errors, "assume": assume, "call": call, "calls": calls, "esdk": esdk}
    print(json.dumps(cases[case](*args), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
