-- wrk script: every request is a distinct non-streaming chat completion body.
local counter = 0
math.randomseed(os.time())
local salt = math.random(1, 1000000000)

request = function()
  counter = counter + 1
  local body = string.format(
    '{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},' ..
    '{"role":"user","content":"unique request %d-%d: what is the capital of France?"}]}',
    salt, counter)
  return wrk.format("POST", "/v1/chat/completions",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer sk-bench-key"}, body)
end
