-- The claim plans as if the pages it reads were in memory, because they
-- are: it reads the head of the due index, the rows its first step has just
-- locked and the attempt rows it has just written. With the server's default
-- random_page_cost (4.0) its cached generic plans joined the claimed events
-- to their new attempt rows in a nested loop over a materialized copy (500 x
-- 500 comparisons for a claim of 500); at 1.1, the value commonly set for
-- data on SSD or in memory, that join is a hash join and each primary-key
-- probe is costed as cheap as it is. Measured on the drain of 100,000 stored
-- events (bench/run.sh, phase c): 6,616 and 6,698 events/s before, 7,470 and
-- 8,257 after, in alternating runs. Only the claim's own statements are
-- affected; the server's setting stays the operator's.

ALTER FUNCTION inbox_claim(text, integer, double precision, text[], integer[], text[], text[], text[],
                           text[], integer[], double precision[], double precision[], boolean[])
    SET random_page_cost = 1.1;
