-- pgdurable_async, version 7: df._refs finds the $name references the worker finds.
-- df.start validates a graph with df._refs; the worker substitutes what its Python tokenizer
-- (pgdurable_async/_graph/tokens.py) finds.  They disagreed on a few inputs; both now follow
-- PostgreSQL's own lexer (tests/integration/test_refs_parity.py holds them to one table):
--   * an identifier starts with a letter, `_` or any non-ASCII character and goes on with
--     those, digits and `$`: the `$x` of `café$x` or `€$x` is part of it, no reference;
--   * `E'...'` takes backslash escapes only when the E is a token of its own, so in
--     `a$e'\'` the `e` ends the identifier `a$e` and a standard string follows;
--   * dollar-quote tags may hold non-ASCII letters (`$é$ ... $é$` is a quoted body);
--   * a `$` right after a closing `$$` starts a new token (`$$a$$$x` references x);
--   * a `--` comment ends at a carriage return as well as at a newline;
--   * `$name.*` takes no `?`: a row set is never null-safe (the worker reads `$x.*?` as
--     `$x.*` followed by the `?` operator, and so does df._refs now).
SELECT pg_advisory_xact_lock(hashtext('pgdurable_async:df'));  -- `df` is shared by all pgdurable schemas

CREATE OR REPLACE FUNCTION df._refs(q text) RETURNS TABLE (name text, null_safe boolean)
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    i int := 1;
    n int := length(q);
    c text;
    esc boolean;
    depth int;
    j int;
    tag text;
    m text[];
BEGIN
    WHILE i <= n LOOP  -- i is always at the start of a token, never inside an identifier
        c := substr(q, i, 1);
        IF c = '''' OR (c IN ('e', 'E') AND substr(q, i + 1, 1) = '''') THEN
            esc := c <> '''';
            i := i + CASE WHEN esc THEN 2 ELSE 1 END;
            WHILE i <= n LOOP
                c := substr(q, i, 1);
                IF esc AND c = E'\\' THEN
                    i := i + 2;
                ELSIF c = '''' AND substr(q, i + 1, 1) = '''' THEN
                    i := i + 2;
                ELSIF c = '''' THEN
                    EXIT;
                ELSE
                    i := i + 1;
                END IF;
            END LOOP;
            i := i + 1;
        ELSIF c = '"' THEN
            i := i + 1;
            WHILE i <= n LOOP
                IF substr(q, i, 2) = '""' THEN
                    i := i + 2;
                ELSIF substr(q, i, 1) = '"' THEN
                    EXIT;
                ELSE
                    i := i + 1;
                END IF;
            END LOOP;
            i := i + 1;
        ELSIF substr(q, i, 2) = '--' THEN  -- up to the end of the line: \n or \r
            j := least(nullif(strpos(substr(q, i), E'\n'), 0), nullif(strpos(substr(q, i), E'\r'), 0));
            i := CASE WHEN j IS NULL THEN n + 1 ELSE i + j END;
        ELSIF substr(q, i, 2) = '/*' THEN
            depth := 0;
            WHILE i <= n LOOP
                IF substr(q, i, 2) = '/*' THEN
                    depth := depth + 1;
                    i := i + 2;
                ELSIF substr(q, i, 2) = '*/' THEN
                    depth := depth - 1;
                    i := i + 2;
                    EXIT WHEN depth = 0;
                ELSE
                    i := i + 1;
                END IF;
            END LOOP;
        ELSIF c = '$' THEN
            m := regexp_match(substr(q, i), '^\$((?:[A-Za-z_]|[^\x01-\x7F])(?:[A-Za-z0-9_]|[^\x01-\x7F])*)?\$');
            IF m IS NOT NULL THEN  -- a dollar quote (a tag, or none): skip its body
                tag := '$' || coalesce(m[1], '') || '$';
                j := strpos(substr(q, i + length(tag)), tag);
                i := CASE WHEN j = 0 THEN n + 1 ELSE i + 2 * length(tag) + j - 1 END;
            ELSE
                -- $name, $name?, $name.column, $name.column? or $name.*
                m := regexp_match(substr(q, i),
                                  '^(\$([A-Za-z_][A-Za-z0-9_]*)(?:\.\*|(?:\.[A-Za-z_][A-Za-z0-9_]*)?(\?)?))');
                IF m IS NOT NULL THEN
                    name := m[2];
                    null_safe := m[3] IS NOT NULL;
                    RETURN NEXT;
                    i := i + length(m[1]);
                ELSIF substr(q, i + 1, 1) ~ '^[0-9]$' THEN
                    RAISE EXCEPTION 'df.start: positional parameters like $1 are not allowed in %; use $name references',
                        quote_literal(left(q, 80));
                ELSE
                    i := i + 1;
                END IF;
            END IF;
        ELSIF c ~ '^[A-Za-z_]$' OR ascii(c) > 127 THEN  -- an identifier or keyword: any `$` in it is its own
            i := i + length((regexp_match(substr(q, i), '^(?:[A-Za-z0-9_$]|[^\x01-\x7F])+'))[1]);
        ELSE
            i := i + 1;
        END IF;
    END LOOP;
END $$;
