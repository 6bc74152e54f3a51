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

# The key API server's certificate, signed by the local CA.
make_server_cert() {
  [[ -f "$pki/server.crt" ]] && return 0
  (
    cd "$pki"
    umask 077
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out server.key 2>/dev/null
    openssl req -new -key server.key -subj "/CN=kubekms-server" -out server.csr
    printf '%s\n' 'basicConstraints=CA:FALSE' 'keyUsage=critical,digitalSignature' 'extendedKeyUsage=serverAuth' \
      'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubekms-server.kubekms-system.svc' >server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile server.ext -out server.crt 2>/dev/null
    rm -f server.csr server.ext
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
export ETCDCTL_ENDPOINTS='$etcd_url'
export KUBEKMS_E2E_RUN_DIR='$RUN_DIR'
export KUBEKMS_ROOT_KEY_FILE='$RUN_DIR/root.key'
export KMS_SOCKET='$KMS_SOCKET'
export KUBEKMS_ADDR='https://127.0.0.1:$SERVER_PORT'
export KUBEKMS_CA='$pki/ca.crt'
export KUBEKMS_CONTROLLER_METRICS='http://127.0.0.1:$CONTROLLER_METRICS_PORT'
export KUBEKMS_PLUGIN_METRICS='http://127.0.0.1:$PLUGIN_METRICS_PORT'
export KUBEKMS_SERVER_METRICS='http://127.0.0.1:$SERVER_METRICS_PORT'
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

# apiserver_get PATH: GET on the API server as the admin.
apiserver_get() {
  curl -fsS --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" "$server$1"
}

# Ready, apart from the KMS provider: on a first start the key it needs does not exist
# yet, because the CRDs and the controller come after the API server.
apiserver_ready() {
  apiserver_get "/readyz?exclude=kms-providers"
}

# The EncryptionConfiguration: Secrets through the kubekms KMS v2 plugin, identity to read
# what was stored before encryption was turned on.
write_encryption_config() {
  cat >"$RUN_DIR/encryption-config.yaml" <<EOF
apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
- resources: [secrets]
  providers:
  - kms:
      apiVersion: v2
      name: kubekms
      endpoint: unix://$KMS_SOCKET
      timeout: 3s
  - identity: {}
EOF
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
    --encryption-provider-config "$RUN_DIR/encryption-config.yaml" \
    --encryption-provider-config-automatic-reload=true \
    --profiling=false \
    --shutdown-watch-termination-grace-period=2s \
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
  ln -sfn "$(kubekms_bin)" "$BIN_DIR/kubekms"
}

install_kubekms() {
  local k=(kubectl --kubeconfig "$RUN_DIR/kubeconfig")
  "${k[@]}" get namespace "$KUBEKMS_NAMESPACE" >/dev/null 2>&1 || "${k[@]}" create namespace "$KUBEKMS_NAMESPACE" >/dev/null
  log "applying kubekms RBAC and deletion protection from charts/kubekms"
  "$BIN_DIR/helm" template kubekms "$ROOT_DIR/charts/kubekms" --namespace "$KUBEKMS_NAMESPACE" \
    --kube-version "$("$BIN_DIR/kube-apiserver" --version | awk '{print $2}')" \
    --set plugin.key="$CLUSTER_KEY" --set server.tls.secretName=unused \
    --show-only templates/controller-rbac.yaml --show-only templates/plugin-rbac.yaml \
    --show-only templates/server-rbac.yaml \
    --show-only templates/deletion-protection.yaml \
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
    --selector "!kms.kubekms.io/test-controller" \
    --plugin-key "$CLUSTER_KEY" --plugin-material-role kubekms-plugin
  sha256sum <"$(kubekms_bin)" >"$PID_DIR/controller.binary"
  wait_for controller 60 "the controller's /readyz" curl -fsS "http://127.0.0.1:$CONTROLLER_METRICS_PORT/readyz"
}

# The KmsKey that encrypts the cluster's Secrets.
ensure_cluster_key() {
  local ns="${CLUSTER_KEY%/*}" name="${CLUSTER_KEY#*/}" k=(kubectl --kubeconfig "$RUN_DIR/kubeconfig")
  if ! "${k[@]}" get kmskey "$name" -n "$ns" >/dev/null 2>&1; then
    log "creating the KmsKey $CLUSTER_KEY that encrypts the cluster's Secrets"
    "${k[@]}" apply -f - >/dev/null <<EOF
apiVersion: kms.kubekms.io/v1alpha1
kind: KmsKey
metadata:
  name: $name
  namespace: $ns
spec:
  description: Encrypts the Secrets of the local control plane in etcd (KMS v2)
EOF
  fi
  "${k[@]}" wait kmskey/"$name" -n "$ns" --for=jsonpath='{.status.keyId}' --timeout=60s >/dev/null
}

plugin_cache_exists() {
  [[ -f "$RUN_DIR/plugin/key-cache-v1" && -f "$RUN_DIR/kubekms-plugin.kubeconfig" ]]
}

start_plugin() {
  if pid_alive plugin && ! running_binary_changed plugin; then return 0; fi
  stop plugin
  if pid_alive kube-apiserver; then service_account_kubeconfig kubekms-plugin; fi
  log "starting the kubekms KMS v2 plugin on $KMS_SOCKET (key $CLUSTER_KEY)"
  start plugin "$(kubekms_bin)" plugin \
    --kubeconfig "$RUN_DIR/kubekms-plugin.kubeconfig" \
    --key "$CLUSTER_KEY" \
    --socket "$KMS_SOCKET" \
    --root-key-file "$RUN_DIR/root.key" \
    --state-dir "$RUN_DIR/plugin" \
    --metrics-addr "127.0.0.1:$PLUGIN_METRICS_PORT"
  sha256sum <"$(kubekms_bin)" >"$PID_DIR/plugin.binary"
  wait_for plugin 30 "the plugin's socket" test -S "$KMS_SOCKET"
}

start_server() {
  if pid_alive server && ! running_binary_changed server; then return 0; fi
  stop server
  service_account_kubeconfig kubekms-server
  mkdir -p "$RUN_DIR/server"
  log "starting the kubekms key API server on https://127.0.0.1:$SERVER_PORT"
  start server "$(kubekms_bin)" server \
    --kubeconfig "$RUN_DIR/kubekms-server.kubeconfig" \
    --listen "127.0.0.1:$SERVER_PORT" \
    --tls-cert "$pki/server.crt" \
    --tls-key "$pki/server.key" \
    --root-key-file "$RUN_DIR/root.key" \
    --audit-log "$RUN_DIR/server/audit.log" \
    --metrics-addr "127.0.0.1:$SERVER_METRICS_PORT"
  sha256sum <"$(kubekms_bin)" >"$PID_DIR/server.binary"
  wait_for server 60 "the server's /readyz" curl -fsS "http://127.0.0.1:$SERVER_METRICS_PORT/readyz"
}

up_all() {
  make_pki
  make_server_cert
  write_kubeconfig
  write_encryption_config
  start_etcd
  build_kubekms
  make_root_key
  # With a cache from an earlier run the plugin starts first, as it would beside a
  # restarting kube-apiserver: it serves from the cache until the API server answers.
  if plugin_cache_exists; then start_plugin; fi
  start_apiserver
  install_crds
  install_kubekms
  start_controller
  start_server
  ensure_cluster_key
  start_plugin
  local state
  state="$(kubectl --kubeconfig "$RUN_DIR/kubeconfig" get kmskey "${CLUSTER_KEY#*/}" -n "${CLUSTER_KEY%/*}" -o jsonpath='{.status.state}')"
  if [[ "$state" == Enabled ]]; then
    wait_for kube-apiserver 90 "the KMS provider to be healthy (/healthz/kms-providers)" \
      apiserver_get /healthz/kms-providers
  else
    log "warning: the cluster key $CLUSTER_KEY is $state, so Secrets cannot be written; enable it with:"
    log "  kubectl patch kmskey ${CLUSTER_KEY#*/} -n ${CLUSTER_KEY%/*} --type merge -p '{\"spec\":{\"enabled\":true}}'"
  fi
  write_env
  log "control plane is up: source $RUN_DIR/env"
}

require_tools
if (($# == 0)); then
  up_all
else
  for component in "$@"; do
    case "$component" in
      etcd) start_etcd ;;
      kube-apiserver) start_apiserver ;;
      controller) start_controller ;;
      plugin) start_plugin ;;
      server) start_server ;;
      *) die "unknown component $component (etcd, kube-apiserver, controller, plugin, server)" ;;
    esac
  done
fi
