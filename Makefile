# The two commands a new user needs, and the benchmark. Each runs scripts/setup.sh first, which
# installs whatever is missing on a fresh Debian 12 machine (as root).
.PHONY: demo test bench
demo:
	scripts/demo.sh
test:
	scripts/test.sh
bench:
	bench/run.sh
