# The two commands a new user needs, and the benchmark. Each runs scripts/setup.sh first, which
# installs whatever is missing on a fresh Debian 12 machine (as root).
.PHONY: demo test test-all bench package soak
demo:
	scripts/demo.sh
test:
	scripts/test.sh
# Every supported PostgreSQL version (17 and 18 in Debian roots, see scripts/pg-root.sh), and
# the MySQL/MariaDB companion and certyo-relay also on MySQL 9.7 and MariaDB 11.8 (Debian roots).
test-all:
	PG_VERSIONS="15 17 18" RELAY_SERVERS="mysql mariadb" scripts/test.sh
bench:
	bench/run.sh
# Randomized operation sequences (pg_test/test_sequences.py) with new seeds for SOAK_MINUTES
# (default 10), against the certyo_cdc a `make test` installed; prints each failing seed and
# how to replay it.
SOAK_MINUTES ?= 10
soak:
	scripts/soak.sh $(SOAK_MINUTES)
# The Debian packages, into target/debian/: postgresql-NN-certyo-cdc for 15 (this machine), 17
# and 18 (in their Debian roots), and certyo-relay. Needs cargo-pgrx (scripts/setup.sh).
package:
	scripts/package.sh 15
	scripts/pg-root.sh 17 scripts/package.sh 17
	scripts/pg-root.sh 18 scripts/package.sh 18
	scripts/package.sh relay
