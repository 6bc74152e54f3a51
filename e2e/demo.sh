#!/usr/bin/env bash
# `make demo`: a walkthrough on the local control plane. Every step prints the command
# it runs, so you can paste it yourself afterwards (`source e2e/.run/env` first).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT_DIR"

"$E2E_DIR/up.sh"
source "$RUN_DIR/env"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
say() { printf '\n\033[36m# %s\033[0m\n' "$*"; }
ns=demo
key=app-data

say "The CRDs, and a namespace for the demo"
step kubectl get crds
kubectl get namespace "$ns" >/dev/null 2>&1 || step kubectl create namespace "$ns"

say "Encryption at rest: kube-apiserver sends Secrets through the kubekms KMS v2 plugin"
step cat "$RUN_DIR/encryption-config.yaml"
step kubectl get kmskey cluster-secrets -n kube-system
step kubectl get --raw /healthz/kms-providers
echo

say "Create a Secret; etcd holds only ciphertext"
kubectl delete secret demo-secret -n "$ns" --ignore-not-found >/dev/null
step kubectl create secret generic demo-secret -n "$ns" --from-literal=password=correct-horse-battery-staple
printf '\n\033[1m$ etcdctl get /registry/secrets/%s/demo-secret --print-value-only | head -c 64 | cat -v\033[0m\n' "$ns"
etcdctl get "/registry/secrets/$ns/demo-secret" --print-value-only | head -c 64 | cat -v; echo
if etcdctl get "/registry/secrets/$ns/demo-secret" --print-value-only | grep -q correct-horse; then
  echo "PLAINTEXT FOUND IN ETCD" >&2; exit 1
fi
echo "(the plaintext 'correct-horse-battery-staple' does not occur in the etcd value)"
printf '\n\033[1m$ etcdctl get /registry/secrets/%s/demo-secret --print-value-only | kubekms envelope\033[0m\n' "$ns"
etcdctl get "/registry/secrets/$ns/demo-secret" --print-value-only | kubekms envelope
step kubectl get secret demo-secret -n "$ns" -o jsonpath='{.data.password}'
echo " (base64 of what kubectl reads back through the API server)"

say "Rotate the cluster key: the plugin reports the new key id at once; kube-apiserver uses it"
say "for new writes after its next Status poll (at most a minute)"
old_id="$(etcdctl get "/registry/secrets/$ns/demo-secret" --print-value-only | kubekms envelope | sed -n 's/.*"keyId": "\(.*\)".*/\1/p')"
step kubectl patch kmskey cluster-secrets -n kube-system --type merge -p "{\"spec\":{\"rotation\":{\"onDemandRequest\":\"demo-$(date +%s)\"}}}"
for i in $(seq 1 45); do
  kubectl delete secret demo-rotated -n "$ns" --ignore-not-found >/dev/null
  kubectl create secret generic demo-rotated -n "$ns" --from-literal=password=after-rotation >/dev/null
  new_id="$(etcdctl get "/registry/secrets/$ns/demo-rotated" --print-value-only | kubekms envelope | sed -n 's/.*"keyId": "\(.*\)".*/\1/p')"
  [[ "$new_id" != "$old_id" ]] && break
  sleep 2
done
echo "old Secret's key id: $old_id"
echo "new Secret's key id: $new_id"
step kubectl get secret demo-secret -n "$ns" -o jsonpath='{.data.password}'
echo " (the old Secret still reads)"

say "Create a key: the controller makes version 1 from the OS CSPRNG, wrapped by the root key"
step kubectl apply -n "$ns" -f examples/kmskey.yaml
if [[ "$(kubectl get kmskey "$key" -n "$ns" -o jsonpath='{.status.state}')" != Enabled ]]; then
  # A previous run may have left it disabled or pending deletion: bring it back.
  kubectl patch kmskey "$key" -n "$ns" --type merge -p '{"spec":{"enabled":false,"deletion":{"scheduled":false}}}' >/dev/null
  kubectl patch kmskey "$key" -n "$ns" --type merge -p '{"spec":{"enabled":true}}' >/dev/null
fi
step kubectl wait kmskey/"$key" -n "$ns" --for=jsonpath='{.status.state}'=Enabled --timeout=60s
step kubectl get kmskeys -n "$ns"

say "Rotate on demand: any new value of spec.rotation.onDemandRequest rotates once"
before="$(kubectl get kmskey "$key" -n "$ns" -o jsonpath='{.status.currentVersion}')"
step kubectl patch kmskey "$key" -n "$ns" --type merge -p "{\"spec\":{\"rotation\":{\"onDemandRequest\":\"demo-$(date +%s)\"}}}"
step kubectl wait kmskey/"$key" -n "$ns" --for=jsonpath='{.status.currentVersion}'=$((before + 1)) --timeout=60s
step kubectl get kmskey "$key" -n "$ns" -o jsonpath='{range .status.versions[*]}version {.version}: {.state}, created {.created}{"\n"}{end}'

say "The material is stored only wrapped by the root key, in a cluster-scoped object only kubekms may read"
uid="$(kubectl get kmskey "$key" -n "$ns" -o jsonpath='{.metadata.uid}')"
step kubectl get kmskeymaterial "$uid" -o jsonpath='{range .spec.versions[*]}version {.version} ({.trigger}): {.wrapped}{"\n"}{end}'

say "Disable and enable"
step kubectl patch kmskey "$key" -n "$ns" --type merge -p '{"spec":{"enabled":false}}'
step kubectl wait kmskey/"$key" -n "$ns" --for=jsonpath='{.status.state}'=Disabled --timeout=60s
step kubectl patch kmskey "$key" -n "$ns" --type merge -p '{"spec":{"enabled":true}}'
step kubectl wait kmskey/"$key" -n "$ns" --for=jsonpath='{.status.state}'=Enabled --timeout=60s

say "Schedule deletion: the material is destroyed only after the waiting period (here 30 days)"
step kubectl patch kmskey "$key" -n "$ns" --type merge -p '{"spec":{"deletion":{"scheduled":true}}}'
step kubectl wait kmskey/"$key" -n "$ns" --for=jsonpath='{.status.state}'=PendingDeletion --timeout=60s
step kubectl get kmskey "$key" -n "$ns" -o jsonpath='deletionTime: {.status.deletionTime}{"\n"}'

say "A plain kubectl delete is refused while the key holds material"
step kubectl delete kmskey "$key" -n "$ns" || true

say "Cancel the deletion: as in AWS KMS the key stays Disabled until you enable it"
step kubectl patch kmskey "$key" -n "$ns" --type merge -p '{"spec":{"enabled":false,"deletion":{"scheduled":false}}}'
step kubectl wait kmskey/"$key" -n "$ns" --for=jsonpath='{.status.state}'=Disabled --timeout=60s
step kubectl patch kmskey "$key" -n "$ns" --type merge -p '{"spec":{"enabled":true}}'
step kubectl wait kmskey/"$key" -n "$ns" --for=jsonpath='{.status.state}'=Enabled --timeout=60s

say "Workloads: a ServiceAccount envelope-encrypts a file through the key API"
kubectl get serviceaccount backup -n "$ns" >/dev/null 2>&1 || step kubectl create serviceaccount backup -n "$ns"
kubectl get rolebinding backup-keys -n "$ns" >/dev/null 2>&1 ||
  step kubectl create rolebinding backup-keys -n "$ns" --clusterrole=kubekms-key-user --serviceaccount="$ns:backup"
head -c 300000 /dev/urandom >"$RUN_DIR/demo-plain.bin"
step kubekms encrypt --service-account "$ns/backup" --key "$ns/$key" --context app=demo \
  --in "$RUN_DIR/demo-plain.bin" --out "$RUN_DIR/demo.kkms" --verbose
step kubekms decrypt --service-account "$ns/backup" --in "$RUN_DIR/demo.kkms" --out "$RUN_DIR/demo-back.bin" --verbose
cmp "$RUN_DIR/demo-plain.bin" "$RUN_DIR/demo-back.bin" && echo "(round trip intact)"
printf '\n\033[1m$ tail -n 2 %s\033[0m\n' "$RUN_DIR/server/audit.log"
tail -n 2 "$RUN_DIR/server/audit.log"
step kubekms audit verify "$RUN_DIR/server/audit.log" --root-key-file "$RUN_DIR/root.key"

say "Every transition is an Event"
step kubectl get events -n "$ns" --field-selector involvedObject.name="$key" --sort-by=.eventTime

printf '\nThe control plane keeps running: source e2e/.run/env and use kubectl; `make down` stops it.\n'
