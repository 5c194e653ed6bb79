-- wrk script: a long system prompt (about 1,000 tokens, the same in every request, as an app's
-- instructions are) and a unique short question: every request a cache miss.
local counter = 0
math.randomseed(os.time())
local salt = math.random(1, 1000000000)
local words = {"the", "assistant", "answers", "questions", "about", "orders", "refunds",
  "shipping", "and", "accounts", "politely", "briefly", "never", "invents", "facts", "cites",
  "policy", "sections", "when", "asked"}
local parts = {}
for i = 1, 1000 do parts[i] = words[(i * 7) % #words + 1] end
local system = table.concat(parts, " ")

request = function()
  counter = counter + 1
  local body = string.format(
    '{"model":"gpt-4o-mini","messages":[{"role":"system","content":"%s"},' ..
    '{"role":"user","content":"question %d-%d: where is my order?"}]}',
    system, salt, counter)
  return wrk.format("POST", "/v1/chat/completions",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer sk-bench-key"}, body)
end
