-- wrk script: the same non-streaming chat completion every time (a cache hit after the first).
request = function()
  return wrk.format("POST", "/v1/chat/completions",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer sk-bench-key"},
    '{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},' ..
    '{"role":"user","content":"what is the capital of France?"}]}')
end
