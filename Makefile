# The two commands a new user needs, and the benchmark. Each runs scripts/setup.sh first, which
# installs whatever is missing on a fresh Debian 12 machine (as root).
.PHONY: demo test test-all bench package
demo:
	scripts/demo.sh
test:
	scripts/test.sh
# Every supported PostgreSQL version (17 and 18 in Debian roots, see scripts/pg-root.sh).
test-all:
	PG_VERSIONS="15 17 18" scripts/test.sh
bench:
	bench/run.sh
# The Debian packages, into target/debian/: postgresql-NN-certyo-cdc for 15 (this machine), 17
# and 18 (in their Debian roots), and certyo-relay. Needs cargo-pgrx (scripts/setup.sh).
package:
	scripts/package.sh 15
	scripts/pg-root.sh 17 scripts/package.sh 17
	scripts/pg-root.sh 18 scripts/package.sh 18
	scripts/package.sh relay
