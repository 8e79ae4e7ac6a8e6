-- What the installed certyo_cdc consists of, one sorted line per fact: every member object with
-- its definition, columns, constraints, indexes, triggers, privileges and comments. Two
-- databases whose outputs are equal have the same schema (used by test_upgrade.py to compare
-- an updated installation with a fresh one). OIDs never appear, only names and definitions.
WITH members AS (
    SELECT d.classid, d.objid
      FROM pg_depend d JOIN pg_extension e ON d.refobjid = e.oid AND d.refclassid = 'pg_extension'::regclass
     WHERE e.extname = 'certyo_cdc' AND d.deptype = 'e'
), rels AS (
    SELECT c.oid, c.oid::regclass::text AS name, c.relkind, c.relacl
      FROM members m JOIN pg_class c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid
), procs AS (
    SELECT p.oid FROM members m JOIN pg_proc p ON m.classid = 'pg_proc'::regclass AND p.oid = m.objid
)
SELECT line FROM (
    SELECT 'member ' || pg_describe_object(classid, objid, 0) FROM members
    UNION ALL
    SELECT 'function ' || pg_get_functiondef(oid) || ' acl ' || coalesce((SELECT proacl::text FROM pg_proc WHERE pg_proc.oid = procs.oid), '-')
      FROM procs
    UNION ALL
    SELECT format('relation %s kind %s acl %s', name, relkind, coalesce(relacl::text, '-')) FROM rels
    UNION ALL
    SELECT format('column %s.%s %s notnull %s default %s identity %s generated %s', r.name, a.attname,
                  format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(ad.adbin, ad.adrelid),
                  a.attidentity, a.attgenerated)
      FROM rels r JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
      LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
    UNION ALL
    SELECT format('constraint %s %s %s', r.name, c.conname, pg_get_constraintdef(c.oid))
      FROM rels r JOIN pg_constraint c ON c.conrelid = r.oid
    UNION ALL
    SELECT format('index %s', pg_get_indexdef(i.indexrelid))
      FROM rels r JOIN pg_index i ON i.indrelid = r.oid
    UNION ALL
    SELECT format('trigger %s', pg_get_triggerdef(t.oid))
      FROM rels r JOIN pg_trigger t ON t.tgrelid = r.oid AND NOT t.tgisinternal
    UNION ALL
    SELECT format('view %s %s', r.name, pg_get_viewdef(r.oid)) FROM rels r WHERE r.relkind IN ('v', 'm')
    UNION ALL
    SELECT format('sequence %s %s %s %s %s', r.name, s.seqtypid::regtype, s.seqincrement, s.seqcache, s.seqcycle)
      FROM rels r JOIN pg_sequence s ON s.seqrelid = r.oid
    UNION ALL
    SELECT format('event trigger %s on %s tags %s function %s enabled %s', t.evtname, t.evtevent, t.evttags, t.evtfoid::regproc, t.evtenabled)
      FROM members m JOIN pg_event_trigger t ON m.classid = 'pg_event_trigger'::regclass AND t.oid = m.objid
    UNION ALL
    SELECT format('comment %s %s', pg_describe_object(d.classoid, d.objoid, d.objsubid), d.description)
      FROM pg_description d JOIN members m ON d.classoid = m.classid AND d.objoid = m.objid
    UNION ALL
    SELECT format('schema certyo acl %s', nspacl) FROM pg_namespace WHERE nspname = 'certyo'
    UNION ALL
    SELECT format('extension config %s', e.extconfig::regclass[]::text) FROM pg_extension e WHERE extname = 'certyo_cdc'
) AS facts(line)
ORDER BY line;
