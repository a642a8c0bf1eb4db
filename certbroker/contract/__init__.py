"""Hand-written parts of the contract both sides use: record field paths (:mod:`.fields`),
resident IDs (:mod:`.resident_id`) and the reasons an adapter reports (:mod:`.reasons`)."""
