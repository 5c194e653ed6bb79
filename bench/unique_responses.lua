-- wrk script: every request is a distinct non-streaming Responses API body, the same content as
-- unique_chat.lua's chat bodies (instructions for the system message, input for the user's).
local counter = 0
math.randomseed(os.time())
local salt = math.random(1, 1000000000)

request = function()
  counter = counter + 1
  local body = string.format(
    '{"model":"gpt-4o-mini","instructions":"You are terse.",' ..
    '"input":"unique request %d-%d: what is the capital of France?"}',
    salt, counter)
  return wrk.format("POST", "/v1/responses",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer sk-bench-key"}, body)
end
