-- wrk script: bench/unique_chat.lua's requests with "temperature": 0 and another key (issue 18
-- asked why the two differed in throughput; bench/run.py --variants compares them).
local counter = 0
math.randomseed(os.time())
local salt = math.random(1, 1000000000)

request = function()
  counter = counter + 1
  local body = string.format(
    '{"model":"gpt-4o-mini","temperature":0,"messages":[{"role":"system","content":"You are terse."},' ..
    '{"role":"user","content":"unique request %d-%d: what is the capital of France?"}]}',
    salt, counter)
  return wrk.format("POST", "/v1/chat/completions",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer sk-bench-other-key"}, body)
end
