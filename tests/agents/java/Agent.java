// An unmodified JVM agent: the JDK's own HTTP client calls the OpenAI API twice, knowing
// nothing of drawdown. Only `eval "$(drawdown env)"` in its shell (JAVA_TOOL_OPTIONS) sends
// it through the proxy and makes it trust the proxy's CA. Run as `java Agent.java` (JDK 11+).
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

public class Agent {
    public static void main(String[] args) throws Exception {
        HttpClient client = HttpClient.newHttpClient();
        String body = "{\"model\": \"gpt-4o-mini\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}";
        for (int call = 0; call < 2; call++) {
            HttpRequest request = HttpRequest.newBuilder(URI.create("https://api.openai.com/v1/chat/completions"))
                .header("content-type", "application/json")
                .header("authorization", "Bearer sk-test-java-agent")
                .POST(HttpRequest.BodyPublishers.ofString(body))
                .build();
            HttpResponse<String> response = client.send(request, HttpResponse.BodyHandlers.ofString());
            if (response.statusCode() == 200) {
                System.out.println("ok");
            } else {
                System.out.println("denied " + response.statusCode());
                return;
            }
        }
    }
}
