/* The node's pause image (each pod's sandbox): holds the pod's namespaces open and exits
 * on SIGTERM or SIGINT. Built statically by e2e/cluster.sh, as there is no registry to pull
 * registry.k8s.io/pause from. */
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

int main(void) {
  signal(SIGTERM, stop);
  signal(SIGINT, stop);
  for (;;) pause();
}
