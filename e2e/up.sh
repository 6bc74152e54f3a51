#!/usr/bin/env bash
# Starts a local control plane for kubekms on 127.0.0.1: etcd and kube-apiserver (built
# from the Go module proxy by e2e/tools/build.sh), with RBAC, a service-account issuer
# and an admin kubeconfig; installs the CRDs, kubekms's RBAC and deletion protection (from
# the Helm chart), creates a root key and runs the kubekms controller as its own
# ServiceAccount. Writes e2e/.run/env, which exports KUBECONFIG, ETCDCTL_ENDPOINTS and PATH
# for the tools.
#
# Safe to run twice: what already runs is left alone. `make down` stops it all.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

mkdir -p "$RUN_DIR" "$PID_DIR" "$LOG_DIR"
"$E2E_DIR/tools/build.sh" "$BIN_DIR"

pki="$RUN_DIR/pki"
server="https://127.0.0.1:$APISERVER_PORT"
etcd_url="http://127.0.0.1:$ETCD_CLIENT_PORT"

make_pki() {
  [[ -f "$pki/admin.crt" ]] && return 0
  log "creating a local CA, serving and client certificates, and a service-account key"
  local tmp
  tmp="$(mktemp -d "$RUN_DIR/.pki.XXXXXX")"
  (
    cd "$tmp"
    umask 077
    key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
    key ca.key
    openssl req -x509 -new -key ca.key -subj "/CN=kubekms-e2e-ca" -days 3650 -out ca.crt \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    # sign NAME SUBJECT EXTENSIONS: a leaf certificate signed by the CA.
    sign() {
      key "$1.key"
      openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
      printf '%s\n' "$3" >"$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
      rm -f "$1.csr" "$1.ext"
    }
    sign apiserver "/CN=kube-apiserver" "$(printf '%s\n' \
      'basicConstraints=CA:FALSE' 'keyUsage=critical,digitalSignature' \
      'extendedKeyUsage=serverAuth' \
      'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc')"
    sign admin "/O=system:masters/CN=kubekms-e2e-admin" "$(printf '%s\n' \
      'basicConstraints=CA:FALSE' 'keyUsage=critical,digitalSignature' 'extendedKeyUsage=clientAuth')"
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key 2>/dev/null
    openssl pkey -in sa.key -pubout -out sa.pub
  )
  rm -rf "$pki"
  mv "$tmp" "$pki"
}

# kubeconfig FILE USER CREDENTIALS: writes a kubeconfig for the local API server in which
# USER authenticates with CREDENTIALS (YAML lines of a kubeconfig user entry).
kubeconfig() {
  local file="$1" user="$2" credentials="$3"
  (umask 077; cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kubekms-e2e
  cluster:
    server: $server
    certificate-authority: $pki/ca.crt
users:
- name: $user
  user:
$credentials
contexts:
- name: $user
  context:
    cluster: kubekms-e2e
    user: $user
current-context: $user
EOF
  )
}

write_kubeconfig() {
  kubeconfig "$RUN_DIR/kubeconfig" admin \
    "$(printf '    client-certificate: %s\n    client-key: %s' "$pki/admin.crt" "$pki/admin.key")"
}

write_env() {
  cat >"$RUN_DIR/env" <<EOF
# Written by e2e/up.sh: source it to talk to the local control plane.
export KUBECONFIG='$RUN_DIR/kubeconfig'
export ETCDCTL_API=3
export ETCDCTL_ENDPOINTS='$etcd_url'
export KUBEKMS_E2E_RUN_DIR='$RUN_DIR'
export KUBEKMS_ROOT_KEY_FILE='$RUN_DIR/root.key'
export PATH='$BIN_DIR':"\$PATH"
EOF
}

start_etcd() {
  if pid_alive etcd; then return 0; fi
  log "starting etcd on $etcd_url"
  start etcd "$BIN_DIR/etcd" \
    --name kubekms-e2e \
    --data-dir "$RUN_DIR/etcd" \
    --listen-client-urls "$etcd_url" \
    --advertise-client-urls "$etcd_url" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "kubekms-e2e=http://127.0.0.1:$ETCD_PEER_PORT" \
    --listen-metrics-urls "" \
    --unsafe-no-fsync \
    --log-level warn
  wait_for etcd 60 "etcd to become healthy" "$BIN_DIR/etcdctl" --endpoints "$etcd_url" endpoint health
}

apiserver_ready() {
  curl -fsS --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
    "$server/readyz"
}

start_apiserver() {
  if pid_alive kube-apiserver; then return 0; fi
  log "starting kube-apiserver on $server"
  start kube-apiserver "$BIN_DIR/kube-apiserver" \
    --etcd-servers "$etcd_url" \
    --bind-address 127.0.0.1 \
    --advertise-address 127.0.0.1 \
    --endpoint-reconciler-type none \
    --secure-port "$APISERVER_PORT" \
    --tls-cert-file "$pki/apiserver.crt" \
    --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" \
    --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range 10.96.0.0/16 \
    --cert-dir "$RUN_DIR/apiserver-certs" \
    --profiling=false \
    --v=1
  wait_for kube-apiserver 120 "kube-apiserver /readyz" apiserver_ready
}

install_crds() {
  log "applying crds/"
  local k=(kubectl --kubeconfig "$RUN_DIR/kubeconfig")
  "${k[@]}" apply --server-side --force-conflicts -f "$ROOT_DIR/crds/" >/dev/null
  "${k[@]}" wait --for condition=Established --timeout 60s \
    crd/kmskeys.kms.kubekms.io crd/kmsgrants.kms.kubekms.io crd/kmskeymaterials.kms.kubekms.io >/dev/null
}

kubekms_bin() {
  echo "${CARGO_TARGET_DIR:-$ROOT_DIR/target}/debug/kubekms"
}

build_kubekms() {
  log "building kubekms"
  (cd "$ROOT_DIR" && cargo build --quiet --bin kubekms)
}

install_kubekms() {
  local k=(kubectl --kubeconfig "$RUN_DIR/kubeconfig")
  "${k[@]}" get namespace "$KUBEKMS_NAMESPACE" >/dev/null 2>&1 || "${k[@]}" create namespace "$KUBEKMS_NAMESPACE" >/dev/null
  log "applying kubekms RBAC and deletion protection from charts/kubekms"
  "$BIN_DIR/helm" template kubekms "$ROOT_DIR/charts/kubekms" --namespace "$KUBEKMS_NAMESPACE" \
    --kube-version "$("$BIN_DIR/kube-apiserver" --version | awk '{print $2}')" \
    --show-only templates/controller-rbac.yaml --show-only templates/deletion-protection.yaml \
    | "${k[@]}" apply --server-side --force-conflicts -f - >/dev/null
}

# service_account_kubeconfig NAME: a kubeconfig that authenticates as the kubekms
# ServiceAccount NAME with a token from the TokenRequest API.
service_account_kubeconfig() {
  local sa="$1" token
  token="$(kubectl --kubeconfig "$RUN_DIR/kubeconfig" create token "$sa" -n "$KUBEKMS_NAMESPACE" --duration 720h)"
  kubeconfig "$RUN_DIR/$sa.kubeconfig" "$sa" "    token: $token"
}

make_root_key() {
  [[ -f "$RUN_DIR/root.key" ]] && return 0
  "$(kubekms_bin)" root-key create --out "$RUN_DIR/root.key" >&2
}

# running_binary_changed NAME: whether NAME runs an older build of kubekms than the
# current one (so `make up` after a rebuild restarts it).
running_binary_changed() {
  local stamp="$PID_DIR/$1.binary"
  [[ -f "$stamp" ]] && [[ "$(cat "$stamp")" != "$(sha256sum <"$(kubekms_bin)")" ]]
}

start_controller() {
  if pid_alive controller && ! running_binary_changed controller; then return 0; fi
  stop controller
  service_account_kubeconfig kubekms-controller
  log "starting the kubekms controller (metrics on 127.0.0.1:$CONTROLLER_METRICS_PORT)"
  start controller "$(kubekms_bin)" controller \
    --kubeconfig "$RUN_DIR/kubekms-controller.kubeconfig" \
    --root-key-file "$RUN_DIR/root.key" \
    --metrics-addr "127.0.0.1:$CONTROLLER_METRICS_PORT" \
    --leader-election-namespace "$KUBEKMS_NAMESPACE" \
    --selector "!kms.kubekms.io/test-controller"
  sha256sum <"$(kubekms_bin)" >"$PID_DIR/controller.binary"
  wait_for controller 60 "the controller's /readyz" curl -fsS "http://127.0.0.1:$CONTROLLER_METRICS_PORT/readyz"
}

make_pki
write_kubeconfig
start_etcd
start_apiserver
install_crds
build_kubekms
install_kubekms
make_root_key
start_controller
write_env
log "control plane is up: source $RUN_DIR/env"
