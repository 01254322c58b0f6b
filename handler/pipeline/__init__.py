"""The request pipeline, after a protocol has parsed its body: native shapes into instances, instances into prompts."""
