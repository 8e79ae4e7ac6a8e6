# The two commands a new user needs, and the benchmark. Each runs scripts/setup.sh first, which
# installs whatever is missing on a fresh Debian 12 machine (as root).
.PHONY: demo test test-all bench
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
